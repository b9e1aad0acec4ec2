"""Structured output: requests whose tokens must follow a grammar (JSON schema, regex, choice, EBNF).

`params.py` says what a request asks for, `grammar.py` compiles it (xgrammar, cached), `manager.py`
keeps each constrained request's matcher and fills the step's token bitmask, `bitmask.py` applies it
to the logits in the sampler.
"""
