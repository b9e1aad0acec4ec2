"""Real-text prompts for the real-model tests and benchmarks (SmolLM2-135M-Instruct, the demo model):
chats of varied lengths, tasks and styles, and the texts a reply copies (n-gram speculation's best case)."""

from __future__ import annotations

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "user", "content": "List three fruits that are red."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "How do I make a cup of tea?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "user", "content": "Write a Python function that returns the square of a number."}],
    [{"role": "user", "content": "Give me a name for a small grey cat."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "What colour is grass?"}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet?"},
     {"role": "assistant", "content": "William Shakespeare wrote Romeo and Juliet."},
     {"role": "user", "content": "When was he born?"}],
    [{"role": "user", "content": "Summarise this: The meeting was moved from Monday to Wednesday because the "
                                 "projector was broken, and everyone agreed to bring their own laptops."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Describe the water cycle to a ten year old child, step by step, with an "
                                 "example from everyday life, and finish with a short question to check "
                                 "that they understood it."}],
    [{"role": "user", "content": "What are the planets of the solar system?"}],
    [{"role": "user", "content": "Tell me a joke about computers."}],
]

# A summarisation-style request whose answer repeats its input: where n-gram speculation pays off.
ARTICLE = (
    "The city council met on Tuesday evening to discuss the new bicycle lanes on Main Street. "
    "The council approved the plan to build protected bicycle lanes on Main Street by next summer. "
    "The new bicycle lanes will connect the train station with the university campus. "
    "Shop owners on Main Street asked the council to keep some parking spaces for delivery vans. "
    "The council agreed to keep ten parking spaces for delivery vans on Main Street."
)
CODE = (
    "def area(width, height):\n    return width * height\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n"
)
SUMMARY_CHAT: list[dict[str, str]] = [
    {"role": "user", "content": f"Repeat the following text exactly, sentence by sentence:\n\n{ARTICLE}"},
]
