"""SpeculationGuard on its own: the batch cutoff, the per-request cool-down after poor acceptance (doubling,
capped, reset by a good window), the own clock of seeded sampled requests, and `is_quiet` exactly when no
request will want drafts at the next two steps."""

from __future__ import annotations

import random

import pytest

from infergrid.worker.spec_decode.guard import (
    COOL_DOWN_STEPS,
    MAX_COOL_DOWN_STEPS,
    MIN_VERIFICATIONS,
    OWN_CLOCK_LEAD,
    WINDOW,
    SpeculationGuard,
)


def step(guard: SpeculationGuard, wanting: dict[str, int | None], own: frozenset[str] = frozenset(),
         batch: int | None = None) -> set[str]:
    """One step in which the requests of `wanting` sample: each that had drafts accepted the given number
    (None: it had none to verify). Returns those that want drafts for the next step, which then accept
    what the next call says."""
    guard.begin_step(len(wanting) if batch is None else batch)
    for req_id, accepted in wanting.items():
        if accepted is not None:
            guard.observe(req_id, accepted)
    wants = {r for r in wanting if guard.wants_drafts(r, r in own)}
    guard.end_step()
    return wants


def test_every_request_speculates_at_or_below_the_cutoff_and_none_above():
    guard = SpeculationGuard(disable_by_batch_size=4)
    assert step(guard, dict.fromkeys("abcd")) == set("abcd")
    assert not guard.is_quiet
    assert step(guard, dict.fromkeys("abcde")) == set()  # 5 > 4
    assert guard.is_quiet  # every one is on the engine's clock: pipeline
    assert step(guard, dict.fromkeys("abcd", 3)) == set("abcd")  # back under the cutoff
    assert guard.num_steps_over_cutoff_total == 1


def test_seeded_sampled_requests_ignore_the_cutoff_and_start_after_their_lead():
    guard = SpeculationGuard(disable_by_batch_size=1)
    own = frozenset({"s"})
    wants = [step(guard, {"s": None, "r": None}, own) for _ in range(OWN_CLOCK_LEAD + 2)]
    assert wants == [set()] * OWN_CLOCK_LEAD + [{"s"}] * 2  # over the cutoff, and yet on its own clock
    assert not guard.is_quiet


def test_poor_acceptance_cools_a_request_down_doubling_each_time_it_fails_again():
    guard = SpeculationGuard(disable_by_batch_size=32)
    on_steps = []
    for t in range(4000):
        if step(guard, {"r": 0 if on_steps and on_steps[-1] == t - 1 else None}):
            on_steps.append(t)
    # Runs of MIN_VERIFICATIONS verifications, then cool-downs that double up to the cap, resuming at multiples.
    runs = []
    for t in on_steps:
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    assert all(end - start + 1 == MIN_VERIFICATIONS for start, end in runs[:-1])
    gaps = [b[0] - a[1] - 1 for a, b in zip(runs, runs[1:], strict=False)]
    cool_downs = [COOL_DOWN_STEPS * 2**i for i in range(5)] + [MAX_COOL_DOWN_STEPS] * (len(gaps) - 5)
    assert all(c <= g < 2 * c for g, c in zip(gaps, cool_downs, strict=True))
    assert all(start % c == 0 for (start, _), c in zip(runs[1:], cool_downs, strict=True))
    assert len(gaps) >= 7 and guard.num_cool_downs_total == len(gaps) + (guard.is_cooling_down("r"))


def test_a_good_window_resets_the_cool_down_and_good_acceptance_never_stops():
    guard = SpeculationGuard(disable_by_batch_size=32)
    for t in range(500):
        assert step(guard, {"r": 2 if t else None}) == {"r"}  # 2 accepted per verification: always on
    assert guard.num_cool_downs_total == 0
    # Fail once (cool-down 16: 7 zeros push the 2s out), fail again (32: 4 zeros), pass a full window,
    # fail (5 zeros push the 1s out): back to 16.
    zeros_out = WINDOW - 1
    gaps, last_on, accepted = [], guard.step - 1, [0] * (zeros_out + MIN_VERIFICATIONS) + [1] * WINDOW + [0] * 5
    had_drafts = True
    while accepted or len(gaps) < 3:
        now = guard.step
        wants = step(guard, {"r": accepted.pop(0) if had_drafts and accepted else None})
        had_drafts = bool(wants)
        if wants:
            if now - last_on > 1:
                gaps.append(now - last_on - 1)
            last_on = now
    assert not accepted and guard.num_cool_downs_total == 3
    assert [COOL_DOWN_STEPS <= gaps[0] < 2 * COOL_DOWN_STEPS, 2 * COOL_DOWN_STEPS <= gaps[1] < 4 * COOL_DOWN_STEPS,
            COOL_DOWN_STEPS <= gaps[2] < 2 * COOL_DOWN_STEPS] == [True] * 3


def cool_down_gaps(accepted: list[int]) -> list[int]:
    """A request that accepts the given numbers of drafts, verification after verification: the lengths
    of its cool-downs (until it has used them all and resumed once more)."""
    guard = SpeculationGuard(disable_by_batch_size=32)
    gaps: list[int] = []
    last_on, had_drafts = -1, False
    while accepted or not had_drafts:
        now = guard.step
        had_drafts = bool(step(guard, {"r": accepted.pop(0) if had_drafts else None}))
        if had_drafts:
            gaps += [now - last_on - 1] if now - last_on > 1 else []
            last_on = now
    return gaps


def test_only_a_full_window_that_passes_resets_the_cool_down():
    fail_twice = [0] * (2 * MIN_VERIFICATIONS)
    c = COOL_DOWN_STEPS
    gaps = cool_down_gaps(fail_twice + [1, 1, 1, 0, 0, 0, 0])  # passes at 4, 5, 6 verifications; fails at 7
    assert all(n <= g < 2 * n for g, n in zip(gaps, [c, 2 * c, 4 * c], strict=True))  # (to the next multiple)
    gaps = cool_down_gaps(fail_twice + [1] * WINDOW + [0] * 5)  # a full window passes first
    assert all(n <= g < 2 * n for g, n in zip(gaps, [c, 2 * c, c], strict=True))


def run(guard: SpeculationGuard, arrivals: dict[str, int], num_steps: int, accept: int = 0,
        own: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """Requests arriving at the given steps, sampling every step, accepting `accept` drafts of each
    verification: the steps at which each wants drafts."""
    on: dict[str, list[int]] = {r: [] for r in arrivals}
    for t in range(num_steps):
        sampling = {r: (accept if on[r] and on[r][-1] == t - 1 else None) for r, at in arrivals.items() if at <= t}
        for r in step(guard, sampling, own):
            on[r].append(t)
    return on


def resumes(on_steps: list[int]) -> list[int]:
    return [t for prev, t in zip(on_steps, on_steps[1:], strict=False) if t > prev + 1]


def test_requests_cooling_down_together_resume_together():
    on = run(SpeculationGuard(disable_by_batch_size=32), {"a": 0, "b": 4}, 200)
    assert len(resumes(on["a"])) >= 3 and resumes(on["a"])[:3] == resumes(on["b"])[:3]
    assert all(t % COOL_DOWN_STEPS == 0 for t in resumes(on["a"]))


def test_is_quiet_from_the_step_every_request_cools_down_until_two_steps_before_one_resumes():
    guard = SpeculationGuard(disable_by_batch_size=32)
    quiet, on = [], []
    for t in range(60):
        on += [t] if step(guard, {"r": 0 if on and on[-1] == t - 1 else None}) else []
        quiet.append(guard.is_quiet)
    # Quiet after each step from the first one off up to the one two steps before it resumes.
    resume = resumes(on)[0]
    assert [t for t, q in enumerate(quiet) if q and t < resume] == list(range(MIN_VERIFICATIONS, resume - 2))
    # The same on a seeded request's own clock, whatever the engine's step count.
    guard = SpeculationGuard(disable_by_batch_size=32)
    for _ in range(5):
        guard.end_step()
    quiet, on = [], []
    for t in range(60):
        on += [t] if step(guard, {"s": 0 if on and on[-1] == t - 1 else None}, frozenset({"s"})) else []
        quiet.append(guard.is_quiet)
    assert on[0] == OWN_CLOCK_LEAD
    resume = resumes(on)[0]
    assert [t for t, q in enumerate(quiet) if q and t < resume] == list(range(OWN_CLOCK_LEAD + MIN_VERIFICATIONS,
                                                                               resume - 2))


@pytest.mark.parametrize("seed", range(3))
def test_is_quiet_holds_for_the_next_two_steps(seed):
    """is_quiet after step t: at steps t + 1 and t + 2 no seeded sampled request wants drafts, and no
    other request known at t does unless the batch crossed the cutoff (it then waits for a synchronous
    step, which its wanting forces)."""
    rng = random.Random(seed)
    guard = SpeculationGuard(disable_by_batch_size=3)
    running: dict[str, int | None] = {"s0": None, "r0": None}
    own, seen = {"s0"}, set()  # (seen: sampled at least once, so the guard knows them)
    history: list[tuple[bool, set[str], bool, set[str]]] = []  # quiet after the step, wanting, over, seen
    for t in range(3000):
        if rng.random() < 0.02:
            name = f"{'s' if rng.random() < 0.3 else 'r'}{t}"
            running[name] = None
            own |= {name} if name[0] == "s" else set()
        if rng.random() < 0.02 and len(running) > 1:
            gone = rng.choice(sorted(running))
            del running[gone]
            guard.remove(gone)
        # The batch stays on one side of the cutoff for long stretches; a request now and then skips a step.
        batch = 5 if (t // 200) % 2 else 1
        sampling = {r: a for r, a in running.items() if rng.random() < 0.95}
        wants = step(guard, sampling, frozenset(own), batch)
        seen |= set(sampling)
        for r in running:
            running[r] = rng.choice([0, 0, 0, 0, 3]) if r in wants else None
        history.append((guard.is_quiet, wants, guard.is_over_cutoff, seen & set(running)))
    num_quiet = 0
    for t in range(len(history) - 2):
        quiet, _, over, known = history[t]
        if not quiet:
            continue
        num_quiet += 1
        later = history[t + 1][1] | history[t + 2][1]
        assert not (later & own)
        if history[t + 1][2] == history[t + 2][2] == over:
            assert not (later & known)
    assert num_quiet > 0.2 * len(history)


def test_bad_cutoffs_are_refused():
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="disable_by_batch_size"):
            SpeculationGuard(bad)  # type: ignore[arg-type]


def test_an_idle_engine_is_not_quiet():
    """New requests on the engine's clock want drafts right after their prefill: with no request known
    (a fresh engine, or every request gone), the next step must not be pipelined."""
    guard = SpeculationGuard(disable_by_batch_size=4)
    assert not guard.is_quiet
    step(guard, dict.fromkeys("abcde"))
    assert guard.is_quiet
    for r in "abcde":
        guard.remove(r)
    assert not guard.is_quiet
