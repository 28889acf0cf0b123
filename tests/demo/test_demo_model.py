"""The demo's embedded model, tokenizer, engine and sleep controller, on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from gpusleep.demo import ByteTokenizer, KVCache, SamplingParams, TinyEngine, TinyTransformer, TinyTransformerConfig  # noqa: E402
from gpusleep.demo.controller import AllocatorController, CpuOnlyController  # noqa: E402
from gpusleep.errors import DriverUnavailableError  # noqa: E402

SMALL = TinyTransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=64)


@pytest.fixture(scope="module")
def engine():
    return TinyEngine(SMALL)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("a", add_bos=True) == [tok.bos_id, 97]
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id]) == "hi"
    with pytest.raises(ValueError, match="token id 999"):
        tok.validate([1, 999])


def test_weights_are_a_function_of_the_seed():
    a, b = TinyTransformer(SMALL).state_dict(), TinyTransformer(SMALL).state_dict()
    c = TinyTransformer(dataclasses.replace(SMALL, seed=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_the_model_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    TinyTransformer(SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_kv_cache_decoding_matches_a_full_forward():
    model = TinyTransformer(SMALL).eval()
    ids = torch.tensor([5, 17, 99, 3, 42, 7])
    with torch.inference_mode():
        full = model(ids, KVCache(SMALL, torch.device("cpu")), 0)
        cache = KVCache(SMALL, torch.device("cpu"))
        steps = [model(ids[:3], cache, 0)] + [model(ids[i : i + 1], cache, i) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_same_seed_same_text_and_greedy_is_deterministic(engine):
    prompt = engine.tokenize("The cat")
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=42)
    first = engine.generate(prompt, sampled)
    assert engine.generate(prompt, sampled) == first
    assert engine.generate(prompt, dataclasses.replace(sampled, seed=43)).text != first.text
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    assert engine.generate(prompt, greedy) == engine.generate(prompt, greedy)
    assert len(first.token_ids) == 12 and first.finish_reason == "length"
    assert all(32 <= t < 127 or t == 10 for t in first.token_ids)  # readable ASCII only
    assert first.prompt_tokens == len(prompt)


def test_stop_string_and_length_limits(engine):
    prompt = engine.tokenize("x")
    full = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=5))
    stop = full.text[3:5]
    cut = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=5, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    near_end = engine.generate([65] * (SMALL.max_seq_len - 2), SamplingParams(max_tokens=10, temperature=0))
    assert len(near_end.token_ids) == 2 and near_end.finish_reason == "length"
    with pytest.raises(ValueError, match="at most 63"):
        engine.generate([65] * SMALL.max_seq_len, SamplingParams())


def test_embeddings_are_unit_vectors_and_differ_by_input(engine):
    a = torch.tensor(engine.embed(engine.tokenize("apple")))
    b = torch.tensor(engine.embed(engine.tokenize("zebra crossing")))
    assert a.shape == (SMALL.d_model,)
    assert float(a.norm()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="empty"):
        engine.embed([])


def test_reload_weights_restores_discarded_weights():
    engine = TinyEngine(SMALL)
    params = SamplingParams(max_tokens=8, temperature=0.7, seed=3)
    before = engine.generate(engine.tokenize("hi"), params)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()  # what a level-2 sleep and wake leave
    assert engine.generate(engine.tokenize("hi"), params) != before
    engine.reload_weights()
    assert engine.generate(engine.tokenize("hi"), params) == before


def test_weights_and_kv_cache_are_allocated_in_their_scopes():
    entered = []

    def scope(name):
        class Scope:
            def __enter__(self):
                entered.append(name)

            def __exit__(self, *exc):
                return False

        return Scope

    TinyEngine(SMALL, weights_scope=scope("weights"), kv_cache_scope=scope("kv_cache"))
    assert entered == ["weights", "kv_cache"]


def test_cpu_controller_says_sleep_needs_cuda():
    controller = CpuOnlyController("cpu")
    assert controller.is_sleeping is False
    with pytest.raises(DriverUnavailableError, match="needs a CUDA device"):
        controller.sleep(1)
    with pytest.raises(DriverUnavailableError, match="--device cuda"):
        controller.wake_up(None)
    with pytest.raises(DriverUnavailableError, match="needs a CUDA device"):
        controller.check_sleep(2)  # said before the control plane turns anyone away


class _FakeAllocator:
    def __init__(self):
        self.sleeping_tags = frozenset()
        self.known_tags = frozenset({"weights", "kv_cache"})
        self.marked_changed = []

    @property
    def is_sleeping(self):
        return bool(self.sleeping_tags)

    def sleep(self, level):
        self.sleeping_tags = frozenset({"weights", "kv_cache"})
        return f"slept {level}"

    def wake_up(self, tags):
        self.sleeping_tags = self.sleeping_tags - set(tags or self.sleeping_tags)
        return "woke"

    def mark_changed(self, tag):
        self.marked_changed.append(tag)


class _CountingEngine:
    device = torch.device("cpu")

    def __init__(self):
        self.reloads = 0

    def reload_weights(self):
        self.reloads += 1


def test_allocator_controller_reloads_weights_after_level_2_only():
    alloc, engine = _FakeAllocator(), _CountingEngine()
    controller = AllocatorController(alloc, engine)
    assert controller.sleep(1) == "slept 1" and controller.is_sleeping
    controller.wake_up(None)
    assert engine.reloads == 0 and not controller.is_sleeping
    controller.sleep(2)
    controller.wake_up(["kv_cache"])  # staged wake: weights still asleep, nothing to reload yet
    assert engine.reloads == 0
    controller.wake_up(["weights"])
    assert engine.reloads == 1 and alloc.marked_changed == ["weights"]  # a kept host copy is stale now
    controller.wake_up(None)
    assert engine.reloads == 1
    assert controller.known_tags == {"weights", "kv_cache"}


def test_nucleus_sampling_is_seeded_and_stays_in_the_nucleus():
    from gpusleep.demo.engine import sample_next

    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    draws = [sample_next(logits, params, torch.Generator().manual_seed(s), None) for s in range(40)]
    assert set(draws) <= {0, 1}  # the top tokens whose mass reaches 0.5, never the tail
    again = [sample_next(logits, params, torch.Generator().manual_seed(s), None) for s in range(40)]
    assert draws == again
    allowed = torch.tensor([False, False, True, True, True])
    assert sample_next(logits, SamplingParams(temperature=0), torch.Generator(), allowed) == 2


def test_generation_stops_when_asked_to_abort(engine):
    from gpusleep.demo.engine import GenerationAbortedError

    polls = []

    def should_abort() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(GenerationAbortedError, match="going to sleep"):
        engine.generate(engine.tokenize("abc"), SamplingParams(max_tokens=30, temperature=0), should_abort)
    assert len(polls) == 4  # stopped at the first check that said so, not after 30 tokens
    with pytest.raises(GenerationAbortedError, match="not started"):
        engine.generate(engine.tokenize("abc"), SamplingParams(max_tokens=30), lambda: True)
    assert (
        len(engine.generate(engine.tokenize("abc"), SamplingParams(max_tokens=5, temperature=0), lambda: False).text)
        == 5
    )


@given(
    logits=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=2, max_size=12),
    temperature=st.floats(0.0, 2.0, allow_nan=False) | st.sampled_from([5e-324, 1e-39, 1e-300]),
    top_p=st.floats(0.0, 1.0, exclude_min=True, allow_nan=False) | st.just(5e-324),
    seed=st.integers(-(2**63), 2**64 - 1),
)
@settings(max_examples=200, deadline=None)
def test_sampling_accepts_every_value_the_api_accepts(logits, temperature, top_p, seed):
    """Any temperature in [0, 2], top_p in (0, 1] and 64-bit seed samples a token (no nan, no crash)."""
    from gpusleep.demo.engine import _generator, sample_next

    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    values = torch.tensor(logits)
    token = sample_next(values, params, _generator(torch.device("cpu"), seed), None)
    assert 0 <= token < len(logits)
    if temperature == 0:
        assert values[token] == values.max()


class _WordsAllocator(_FakeAllocator):
    """A fake allocator that treats ``words`` (the extra weights) like GPU memory: a sleep empties it
    (zeros), a level-1 wake puts back what was saved, or other bytes when ``corrupt_next_wake`` is set."""

    def __init__(self):
        super().__init__()
        self.words = None
        self.saved = None
        self.level = 0
        self.corrupt_next_wake = None  # (word index, value) written over the restored bytes

    def sleep(self, level):
        self.level, self.saved = level, self.words.clone() if level == 1 else None
        self.words.zero_()
        return super().sleep(level)

    def wake_up(self, tags):
        if "weights" in (tags or self.sleeping_tags) and self.saved is not None:
            self.words.copy_(self.saved)
            if self.corrupt_next_wake is not None:
                index, value = self.corrupt_next_wake
                self.words[index] = value
                self.corrupt_next_wake = None
        return super().wake_up(tags)


@pytest.fixture
def extra_weights_controller():
    from gpusleep.demo.extra_weights import ExtraWeights

    alloc, engine = _WordsAllocator(), _CountingEngine()
    extra = ExtraWeights(3 * 4096 + 8, seed=5, device=torch.device("cpu"), piece_bytes=4096)
    alloc.words = extra.words
    return AllocatorController(alloc, engine, extra), alloc, engine, extra


def test_extra_weights_come_back_through_level_1_sleeps_and_are_checked(extra_weights_controller):
    controller, alloc, engine, extra = extra_weights_controller
    written = extra.words.clone()
    for _ in range(3):
        controller.sleep(1)
        assert not torch.equal(extra.words, written)  # really gone while asleep
        controller.wake_up(None)
        assert torch.equal(extra.words, written)
    assert engine.reloads == 0 and alloc.marked_changed == []


def test_a_wake_that_brings_back_other_bytes_fails_and_names_the_piece(extra_weights_controller):
    from gpusleep.demo.extra_weights import ExtraWeightsCorruptedError

    controller, alloc, _, extra = extra_weights_controller
    controller.sleep(1)
    alloc.corrupt_next_wake = (2 * 1024 + 7, 12345)  # a word of the third 4096-byte piece
    with pytest.raises(
        ExtraWeightsCorruptedError, match=r"1 of 4 pieces of 4.00 KiB .*pieces 2 \(at 8.00 KiB\)"
    ) as failure:
        controller.wake_up(None)
    assert failure.value.bad_pieces == [2]


def test_a_staged_wake_checks_the_extra_weights_once_the_weights_are_back(extra_weights_controller):
    from gpusleep.demo.extra_weights import ExtraWeightsCorruptedError

    controller, alloc, _, _ = extra_weights_controller
    controller.sleep(1)
    controller.wake_up(["kv_cache"])  # the weights are still asleep (zeros): nothing to check yet
    alloc.corrupt_next_wake = (0, 1)
    with pytest.raises(ExtraWeightsCorruptedError):
        controller.wake_up(["weights"])


def test_after_a_level_2_sleep_the_extra_weights_are_written_again_and_marked_changed(extra_weights_controller):
    controller, alloc, engine, extra = extra_weights_controller
    written = extra.words.clone()
    controller.sleep(2)
    controller.wake_up(None)
    assert torch.equal(extra.words, written)  # the same seeded words, written again
    assert engine.reloads == 1 and alloc.marked_changed == ["weights"]
    controller.sleep(1)
    controller.wake_up(None)  # and they are checked as usual from then on
    assert torch.equal(extra.words, written) and alloc.marked_changed == ["weights"]


@pytest.mark.parametrize("num_bytes,piece_bytes", [(0, 4096), (6, 4096), (4096, 0), (4096, 6)])
def test_extra_weights_refuse_sizes_that_are_not_whole_words(num_bytes, piece_bytes):
    from gpusleep.demo.extra_weights import ExtraWeights

    with pytest.raises(ValueError, match="positive multiples of 4"):
        ExtraWeights(num_bytes, seed=0, device=torch.device("cpu"), piece_bytes=piece_bytes)


def test_a_wake_that_puts_blocks_back_in_the_wrong_place_fails(extra_weights_controller):
    from gpusleep.demo.extra_weights import ExtraWeightsCorruptedError

    controller, alloc, _, extra = extra_weights_controller
    controller.sleep(1)
    first, second = alloc.saved[:1024].clone(), alloc.saved[1024:2048].clone()
    alloc.saved[:1024], alloc.saved[1024:2048] = second, first  # the same words, two pieces swapped
    with pytest.raises(ExtraWeightsCorruptedError) as failure:
        controller.wake_up(None)
    assert failure.value.bad_pieces == [0, 1]


def test_a_reload_that_failed_after_a_level_2_sleep_is_tried_again_at_the_next_wake(extra_weights_controller):
    controller, alloc, engine, extra = extra_weights_controller
    written = extra.words.clone()
    controller.sleep(2)
    engine.reload_weights = lambda: (_ for _ in ()).throw(RuntimeError("out of memory while reloading"))
    with pytest.raises(RuntimeError, match="reloading"):
        controller.wake_up(None)
    assert not controller.is_sleeping and not torch.equal(extra.words, written)  # awake, weights still zeros
    del engine.reload_weights  # the next attempt works
    controller.wake_up(None)  # nothing asleep, but the reload is still owed
    assert engine.reloads == 1 and torch.equal(extra.words, written) and alloc.marked_changed == ["weights"]
