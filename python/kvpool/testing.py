"""Test doubles that run the engine without MLX: a fake model, tokenizer,
storage and ``BatchGenerator``.

The fake "K/V" of a position is the token id at that position, so a fake
cache is a list of token ids and a wrong gather changes what the fake model
generates, exactly as wrong K/V would change a real model's output.

``FakeBatchGenerator`` follows mlx-lm 0.32's ``BatchGenerator`` protocol:
``insert(prompts, max_tokens=, caches=, all_tokens=, samplers=,
logits_processors=, stop_sequences=)`` and ``insert_segments`` (prefill stops
at segment ends, reported as ``end_of_segment``) return uids; ``next()`` returns
``(prompt_responses, generation_responses)``; one prompt chunk is prefilled
per call; the first token of a sequence arrives on the call after its prompt
is done; a finishing response carries ``prompt_cache`` (every layer at offset
``len(all_tokens)``) and ``all_tokens``; it appends to the ``all_tokens`` lists
it is given, in place. A contract test checks it against the real one.
``prefill_batches`` records each prefill batch it runs (the ``next()`` call and
each row's chunk length; mlx-lm pads every row to the longest), for scheduling
tests.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvpool.cache.spec import AttentionKind, ModelCacheSpec
from kvpool.cache.storage import (
    HostArray,
    LayerCodes,
    LayerKV,
    LayerState,
    QuantizedRows,
    first_writable,
    host_dtype,
)
from kvpool.errors import InvalidRequestError

_FAKE_STATES: dict[int, tuple[int, ...]] = {}
"""FakeStorage's host form of a state: digest -> the tokens it was computed from."""


@dataclass(slots=True)
class FakeCache:
    """Token ids at positions ``[offset - len(tokens), offset)`` of one layer.

    ``window`` (sliding layers) bounds the positions kept as mlx-lm's RotatingKVCache
    does: an update of ``S`` tokens keeps at most ``window - 1`` of the old ones and all
    ``S`` new ones (every new token sees a whole window), so a cache holds ``window`` rows
    after a decode step and up to ``window - 1 + S`` after a prefill chunk.
    """

    tokens: list[int] = field(default_factory=list)
    offset: int = 0
    window: int | None = None

    def append(self, new: Sequence[int]) -> None:
        if self.window is not None and len(self.tokens) > self.window - 1:
            del self.tokens[: len(self.tokens) - (self.window - 1)]
        self.tokens.extend(new)
        self.offset += len(new)

    @property
    def visible(self) -> list[int]:
        """What the next token attends to: every position, or a sliding layer's last
        ``window``."""
        return self.tokens if self.window is None else self.tokens[-self.window :]

    def copy(self) -> FakeCache:
        return FakeCache(list(self.tokens), self.offset, self.window)


@dataclass(slots=True)
class FakeModel:
    """A deterministic "language model" over token ids.

    The next token is a hash of what every layer's cache shows (all positions
    for global layers, the last ``window`` for sliding ones).
    """

    spec: ModelCacheSpec
    vocab_size: int = 1000

    @property
    def args(self) -> SimpleNamespace:
        """Like an mlx-lm model's ``args``: only ``vocab_size``."""
        return SimpleNamespace(vocab_size=self.vocab_size)

    def make_cache(self) -> list[FakeCache]:
        return [FakeCache(window=layer.window) for layer in self.spec.layers]

    def next_token(self, caches: Sequence[FakeCache]) -> int:
        h = 0
        for i, cache in enumerate(caches):
            data = f"{i}:{cache.offset}:{','.join(map(str, cache.visible))}".encode()
            h = zlib.crc32(data, h)
        return h % self.vocab_size


class FakeDetokenizer:
    """mlx-lm's streaming detokenizer protocol over :class:`FakeTokenizer`'s decode."""

    def __init__(self, tokenizer: FakeTokenizer) -> None:
        self._tokenizer = tokenizer
        self.tokens: list[int] = []
        self.offset = 0

    def reset(self) -> None:
        self.tokens, self.offset = [], 0

    def add_token(self, token: int) -> None:
        self.tokens.append(token)

    def finalize(self) -> None:
        """Nothing is held back: every fake token is one whole character."""

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self.tokens)

    @property
    def last_segment(self) -> str:
        text = self.text
        segment, self.offset = text[self.offset :], len(text)
        return segment


class FakeTokenizer:
    """Characters <-> token ids (``ord(c) % vocab_size``); EOS is id 0."""

    def __init__(self, vocab_size: int = 1000) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = {0}

    def encode(self, text: str) -> list[int]:
        return [max(1, ord(c) % self.vocab_size) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)

    @property
    def detokenizer(self) -> FakeDetokenizer:
        """A fresh streaming detokenizer, as mlx-lm's TokenizerWrapper gives."""
        return FakeDetokenizer(self)


class FakeStorage:
    """A :class:`kvpool.cache.storage.KVStorage` that stores token ids per slot.

    Reading a slot that was never written raises AssertionError, so tests
    catch gathers of positions the blocks do not hold.

    As host arrays (``read_layers``/``write_layers``) position ``p`` of a
    layer is every element of row ``p`` set to the bits of its token id (keys)
    or of the id's bitwise complement (values), in the spec's host dtype; so a
    saved and restored fake cache is byte for byte what persistence wrote.

    A quantized spec (``spec.kv_bits``) sizes :attr:`nbytes` by its format, and its
    blocks read and write as codes (``read_codes``/``write_codes``): every code word of
    row ``p`` holds token ``p`` (keys) or its complement (values), every scale the low
    bits of the same word and every bias their complement, shaped as ``mx.quantize``
    shapes them. Dense formats refuse ``read_codes``/``write_codes`` as the real
    storage does.
    """

    def __init__(self, spec: ModelCacheSpec, blocks_per_group: Sequence[int]) -> None:
        self.spec = spec
        self.blocks_per_group = tuple(blocks_per_group)
        self.slots: list[dict[int, int]] = [{} for _ in spec.layers]  # position slot -> token
        # recurrent layers: block -> the tokens its state was computed from
        self.states: list[dict[int, tuple[int, ...]]] = [{} for _ in spec.layers]
        self._group_of_layer = spec.group_of_layer()
        self.num_loads = 0
        self.num_stores = 0

    @property
    def nbytes(self) -> int:
        return sum(
            n * self.spec.group_bytes_per_block(g) for g, n in enumerate(self.blocks_per_group)
        )

    def resize(
        self, blocks_per_group: Sequence[int], moves: Sequence[Mapping[int, int]] = ()
    ) -> None:
        """At once (no MLX here): moved blocks first, then the sizes; a block taken away
        forgets what it held, so a read of it after it is added back fails as never
        written."""
        size = self.spec.block_tokens
        for i in range(len(self.spec.layers)):
            group_moves = moves[self._group_of_layer[i]] if moves else {}
            for src, dst in group_moves.items():
                for r in range(size):
                    token = self.slots[i].pop(src * size + r, None)
                    self.slots[i].pop(dst * size + r, None)
                    if token is not None:
                        self.slots[i][dst * size + r] = token
                state = self.states[i].pop(src, None)
                self.states[i].pop(dst, None)
                if state is not None:
                    self.states[i][dst] = state
        self.blocks_per_group = tuple(blocks_per_group)
        for i in range(len(self.spec.layers)):
            n = self.blocks_per_group[self._group_of_layer[i]]
            self.slots[i] = {slot: t for slot, t in self.slots[i].items() if slot < n * size}
            self.states[i] = {b: t for b, t in self.states[i].items() if b < n}

    def _slot(self, tables: Sequence[Sequence[int]], layer: int, position: int) -> int:
        size = self.spec.block_tokens
        block = tables[self._group_of_layer[layer]][position // size]
        assert 0 <= block < self.blocks_per_group[self._group_of_layer[layer]], (
            f"layer {layer} position {position}: block {block} is not a block of its group"
        )
        return block * size + position % size

    def load(self, tables: Sequence[Sequence[int]], num_tokens: int) -> list[Any]:
        self.num_loads += 1
        caches: list[Any] = []
        for i, layer in enumerate(self.spec.layers):
            if layer.kind is AttentionKind.RECURRENT:
                block = tables[self._group_of_layer[i]][(num_tokens - 1) // self.spec.block_tokens]
                assert block in self.states[i], f"layer {i}: block {block} holds no state"
                state = self.states[i][block]
                assert len(state) == num_tokens, (
                    f"layer {i}: block {block} holds the state of {len(state)} tokens, "
                    f"not {num_tokens}"
                )
                caches.append(FakeCache(list(state), num_tokens, None))
                continue
            held = num_tokens if layer.window is None else min(num_tokens, layer.window - 1)
            tokens = []
            for p in range(num_tokens - held, num_tokens):
                slot = self._slot(tables, i, p)
                assert slot in self.slots[i], f"layer {i} position {p} was never written"
                tokens.append(self.slots[i][slot])
            caches.append(FakeCache(tokens, num_tokens, layer.window))
        return caches

    def store(
        self, caches: Sequence[Any], tables: Sequence[Sequence[int]], start: int
    ) -> tuple[int, ...]:
        self.num_stores += 1
        size = self.spec.block_tokens
        written_from = [start] * len(self.blocks_per_group)
        for i, cache in enumerate(caches):
            g = self._group_of_layer[i]
            if self.spec.layers[i].kind is AttentionKind.RECURRENT:
                table = tables[g]
                j = len(table) - 1
                if j < 0 or table[j] < 0 or j * size < start:
                    written_from[g] = max(written_from[g], len(table) * size)
                    continue
                assert len(cache.tokens) == cache.offset, "a state needs every token"
                self.states[i][table[j]] = tuple(cache.tokens)
                written_from[g] = max(written_from[g], j * size)
                continue
            base = cache.offset - len(cache.tokens)
            first = first_writable(tables[g], max(start, base), size)
            written_from[g] = max(written_from[g], first)
            for p in range(first, cache.offset):
                self.slots[i][self._slot(tables, i, p)] = cache.tokens[p - base]
        return tuple(written_from)

    def read_layers(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        out = []
        for i in layers:
            tokens = []
            for p in range(start, stop):
                slot = self._slot(tables, i, p)
                assert slot in self.slots[i], f"layer {i} position {p} was never written"
                tokens.append(self.slots[i][slot])
            out.append(LayerKV(i, start, *self._encode(i, tokens)))
        return out

    def read_states(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], num_tokens: int
    ) -> list[LayerState]:
        """A state as host arrays: element 0 of the first array holds the bits of a
        digest of its tokens (every FakeStorage of the process shares digest -> tokens, so
        a state read from one fake pool can be written into another), the rest stays 0."""
        out = []
        for i in layers:
            block = tables[self._group_of_layer[i]][(num_tokens - 1) // self.spec.block_tokens]
            state = self.states[i][block]
            assert len(state) == num_tokens, f"layer {i}: a state of {len(state)} tokens"
            digest = zlib.crc32(",".join(map(str, state)).encode())
            _FAKE_STATES[digest] = state
            arrays = []
            for e, spec in enumerate(self.spec.layers[i].states):
                array = np.zeros(spec.shape, host_dtype(spec.dtype))
                if e == 0:
                    array.reshape(-1).view(np.uint8)[:4] = np.frombuffer(
                        digest.to_bytes(4, "little"), np.uint8
                    )
                arrays.append(array)
            out.append(LayerState(i, num_tokens, tuple(arrays)))
        return out

    def write_states(self, tables: Sequence[Sequence[int]], states: Sequence[LayerState]) -> None:
        for st in states:
            i = st.layer
            block = tables[self._group_of_layer[i]][(st.num_tokens - 1) // self.spec.block_tokens]
            digest = int.from_bytes(st.arrays[0].reshape(-1).view(np.uint8)[:4].tobytes(), "little")
            tokens = _FAKE_STATES.get(digest)
            assert tokens is not None and len(tokens) == st.num_tokens, "an unknown fake state"
            self.states[i][block] = tokens

    def write_layers(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerKV]) -> None:
        for kv in kvs:
            tokens = self._decode(kv)
            for t, token in enumerate(tokens):
                self.slots[kv.layer][self._slot(tables, kv.layer, kv.start + t)] = token

    def read_codes(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerCodes]:
        self._check_quantized("read_codes")
        out = []
        for kv in self.read_layers(tables, layers, start, stop):
            tokens = self._decode(kv)
            out.append(
                LayerCodes(kv.layer, start, *(self._rows(kv.layer, tokens, v) for v in (0, 1)))
            )
        return out

    def write_codes(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerCodes]) -> None:
        self._check_quantized("write_codes")
        for kv in kvs:
            ids = kv.keys.codes[0, :, 0]
            for which, rows in enumerate((kv.keys, kv.values)):
                expect = self._rows(kv.layer, [int(t) for t in ids], which)
                for name in ("codes", "scales", "biases"):
                    got, want = getattr(rows, name), getattr(expect, name)
                    assert got.shape == want.shape and got.dtype == want.dtype, (
                        f"layer {kv.layer} {name}: {got.shape} {got.dtype}, expected "
                        f"{want.shape} {want.dtype}"
                    )
                    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (
                        f"layer {kv.layer} {name} are not fake codes"
                    )
            for t, token in enumerate(ids):
                self.slots[kv.layer][self._slot(tables, kv.layer, kv.start + t)] = int(token)

    def _check_quantized(self, what: str) -> None:
        if not self.spec.format.is_quantized:
            raise InvalidRequestError(f"{what}: the pool's blocks are dense ({self.spec.dtype})")

    def _rows(self, layer: int, tokens: Sequence[int], complement: int) -> QuantizedRows:
        spec, fmt = self.spec.layers[layer], self.spec.format
        dim = spec.v_head_dim if complement else spec.k_head_dim
        words = np.asarray(tokens, dtype="<u4")[None, :, None]
        if complement:
            words = ~words
        heads, n = spec.n_kv_heads, len(tokens)
        codes = np.broadcast_to(words, (heads, n, fmt.codes_dim(dim)))
        small = self._bits()
        low = (words & np.uint32(2 ** (8 * small.itemsize) - 1)).astype(small)
        scales = np.broadcast_to(low, (heads, n, fmt.scales_dim(dim)))
        dtype = host_dtype(self.spec.dtype)
        return QuantizedRows(
            np.ascontiguousarray(codes),
            np.ascontiguousarray(scales).view(dtype),
            np.ascontiguousarray(~scales).view(dtype),
        )

    def _bits(self) -> np.dtype[Any]:
        return np.dtype(f"<u{host_dtype(self.spec.dtype).itemsize}")

    def _encode(self, layer: int, tokens: Sequence[int]) -> tuple[HostArray, HostArray]:
        spec, bits = self.spec.layers[layer], self._bits()
        ids = np.asarray(tokens, dtype=bits)[None, :, None]
        heads, n = spec.n_kv_heads, len(tokens)
        keys = np.broadcast_to(ids, (heads, n, spec.k_head_dim))
        values = np.broadcast_to(~ids, (heads, n, spec.v_head_dim))
        dtype = host_dtype(self.spec.dtype)
        return np.ascontiguousarray(keys).view(dtype), np.ascontiguousarray(values).view(dtype)

    def _decode(self, kv: LayerKV) -> list[int]:
        spec, bits = self.spec.layers[kv.layer], self._bits()
        keys, values = kv.keys.view(bits), kv.values.view(bits)
        assert keys.shape == (spec.n_kv_heads, kv.num_tokens, spec.k_head_dim), keys.shape
        assert values.shape == (spec.n_kv_heads, kv.num_tokens, spec.v_head_dim), values.shape
        ids = keys[0, :, 0]
        assert (keys == ids[None, :, None]).all(), f"layer {kv.layer}: keys are not fake K/V"
        assert (values == ~ids[None, :, None]).all(), f"layer {kv.layer}: values do not match"
        return [int(t) for t in ids]


@dataclass(slots=True)
class PromptResponse:
    uid: int
    progress: tuple[int, int]
    end_of_segment: bool
    end_of_prompt: bool


@dataclass(slots=True)
class GenerationResponse:
    uid: int
    token: int
    logprobs: Any
    finish_reason: str | None
    prompt_cache: list[Any] | None
    all_tokens: list[int] | None


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """One prefill batch the fake ran: in its ``call``-th ``next()``, a chunk of
    ``rows[i][1]`` tokens of sequence ``rows[i][0]`` per row."""

    call: int
    rows: tuple[tuple[int, int], ...]

    @property
    def lengths(self) -> list[int]:
        return [n for _, n in self.rows]


@dataclass(slots=True)
class _Sequence:
    uid: int
    pending: list[list[int]]  # segments of the prompt before its last token, not yet prefilled
    last: int  # the prompt's last token, fed when the sequence starts generating
    total: int
    max_tokens: int
    caches: list[FakeCache]
    tokens: list[int]  # the caller's all_tokens list, appended in place
    stops: set[int]
    num_generated: int = 0
    next_token: int | None = None  # computed when the last prompt token is fed


class FakeBatchGenerator:
    """A pure-Python stand-in for ``mlx_lm.generate.BatchGenerator``.

    Greedy only: ``samplers`` are accepted and ignored; ``stop_sequences``
    must be None (the default stop tokens apply).
    """

    def __init__(
        self,
        model: FakeModel,
        *,
        max_tokens: int = 128,
        stop_tokens: Sequence[Sequence[int]] | None = None,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        **_: Any,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.stop_tokens = {seq[0] for seq in stop_tokens or () if len(seq) == 1}
        self.completion_batch_size = max(completion_batch_size, prefill_batch_size)
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self._uid_count = 0
        self._unprocessed: deque[_Sequence] = deque()
        self._prompt: list[_Sequence] = []
        self._generating: list[_Sequence] = []
        self.num_next_calls = 0
        self.prefill_batches: list[PrefillBatch] = []  # one per next() that prefilled
        self.fail_next: Exception | None = None  # raised by the next next() call
        self.fail_insert: Exception | None = None  # raised by the next insert() call

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int] | None = None,
        caches: list[Any] | None = None,
        all_tokens: list[list[int]] | None = None,
        samplers: list[Any] | None = None,
        logits_processors: list[Any] | None = None,
        stop_sequences: list[Any] | None = None,
    ) -> list[int]:
        return self.insert_segments(
            [[p] for p in prompts],
            max_tokens,
            caches,
            all_tokens,
            samplers,
            logits_processors,
            stop_sequences,
        )

    def insert_segments(
        self,
        segments: list[list[list[int]]],
        max_tokens: list[int] | None = None,
        caches: list[Any] | None = None,
        all_tokens: list[list[int]] | None = None,
        samplers: list[Any] | None = None,
        logits_processors: list[Any] | None = None,
        stop_sequences: list[Any] | None = None,
    ) -> list[int]:
        """Each prompt as segments: prefill stops at every segment's end and reports
        ``end_of_segment`` there (``extract_cache`` then holds the prompt up to it)."""
        if self.fail_insert is not None:
            exc, self.fail_insert = self.fail_insert, None
            raise exc
        n = len(segments)
        max_tokens = max_tokens or [self.max_tokens] * n
        all_tokens = all_tokens or [[] for _ in segments]
        caches = caches or [None] * n
        for name, value in (
            ("max_tokens", max_tokens),
            ("caches", caches),
            ("all_tokens", all_tokens),
        ):
            if len(value) != n:
                raise ValueError(
                    f"Option {name} must have one entry per segment: "
                    f"expected {n}, got {len(value)}."
                )
        if stop_sequences is not None:
            raise NotImplementedError("FakeBatchGenerator supports only the default stop tokens")
        uids = list(range(self._uid_count, self._uid_count + n))
        pending = []
        for uid, parts, m, cache, tokens in zip(
            uids, segments, max_tokens, caches, all_tokens, strict=True
        ):
            parts = [list(part) for part in parts if part]
            if not parts:
                raise ValueError(f"Sequence {uid} has an empty prompt.")
            if m <= 0:
                raise ValueError(f"Sequence {uid}'s max_tokens must be > 0.")
            last = parts[-1][-1]
            parts[-1] = parts[-1][:-1]
            layer_caches = (
                [c.copy() for c in cache] if cache is not None else self.model.make_cache()
            )
            pending.append(
                _Sequence(
                    uid,
                    [part for part in parts if part],
                    last,
                    sum(len(part) for part in parts) + 1,
                    m,
                    layer_caches,
                    tokens,
                    self.stop_tokens,
                )
            )
        self._unprocessed.extend(pending)
        self._uid_count += n
        return uids

    def next(self) -> tuple[list[PromptResponse], list[GenerationResponse]]:
        self.num_next_calls += 1
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        generation = [self._generate(seq) for seq in self._generating]
        self._generating = [
            s for s, r in zip(self._generating, generation, strict=True) if r.finish_reason is None
        ]
        prompt_responses: list[PromptResponse] = []
        if len(self._generating) >= self.completion_batch_size:
            return prompt_responses, generation
        room = min(
            self.prefill_batch_size - len(self._prompt),
            self.completion_batch_size - len(self._generating),
        )
        while room > 0 and self._unprocessed:
            self._prompt.append(self._unprocessed.popleft())
            room -= 1
        # Sequences with only their last token left start generating (as in
        # mlx-lm, that token is fed on its own); the others prefill a chunk.
        still: list[_Sequence] = []
        for seq in self._prompt:
            if seq.pending:
                still.append(seq)
                continue
            self._feed(seq, [seq.last])
            seq.next_token = self.model.next_token(seq.caches)
            self._generating.append(seq)
            prompt_responses.append(PromptResponse(seq.uid, (seq.total, seq.total), True, True))
        rows = []
        for seq in still:
            segment = seq.pending[0]
            chunk = segment[: self.prefill_step_size]
            rows.append((seq.uid, len(chunk)))
            del segment[: len(chunk)]
            if not segment:
                seq.pending.pop(0)
            self._feed(seq, chunk)
            done = seq.total - sum(len(part) for part in seq.pending) - 1
            prompt_responses.append(PromptResponse(seq.uid, (done, seq.total), not segment, False))
        if rows:
            self.prefill_batches.append(PrefillBatch(self.num_next_calls, tuple(rows)))
        self._prompt = still
        return prompt_responses, generation

    def _feed(self, seq: _Sequence, tokens: Sequence[int]) -> None:
        for cache in seq.caches:
            cache.append(tokens)
        seq.tokens.extend(tokens)

    def _generate(self, seq: _Sequence) -> GenerationResponse:
        token = seq.next_token
        assert token is not None
        self._feed(seq, [token])
        seq.num_generated += 1
        seq.next_token = self.model.next_token(seq.caches)
        finish = None
        if seq.num_generated >= seq.max_tokens:
            finish = "length"
        if token in seq.stops:
            finish = "stop"
        logprobs = fake_logprobs(token, self.model.vocab_size)
        if finish is None:
            return GenerationResponse(seq.uid, token, logprobs, None, None, None)
        caches = [c.copy() for c in seq.caches]
        return GenerationResponse(seq.uid, token, logprobs, finish, caches, seq.tokens)

    def extract_cache(self, uids: Sequence[int]) -> dict[int, tuple[list[Any], list[int]]]:
        wanted = set(uids)
        everyone = [*self._unprocessed, *self._prompt, *self._generating]
        return {
            s.uid: ([c.copy() for c in s.caches], s.tokens) for s in everyone if s.uid in wanted
        }

    def remove(self, uids: Sequence[int], return_prompt_caches: bool = False) -> dict[int, Any]:
        caches = self.extract_cache(uids) if return_prompt_caches else {}
        wanted = set(uids)
        self._unprocessed = deque(s for s in self._unprocessed if s.uid not in wanted)
        self._prompt = [s for s in self._prompt if s.uid not in wanted]
        self._generating = [s for s in self._generating if s.uid not in wanted]
        return caches

    def close(self) -> None:
        """Nothing to release; present because the real one has it."""

    @property
    def num_active(self) -> int:
        return len(self._unprocessed) + len(self._prompt) + len(self._generating)


def fake_logprobs(token: int, vocab_size: int) -> np.ndarray:
    """The fake's distribution for a step that chose ``token``: a log-softmax row in which
    ``token`` is the most likely, ``(7 * token + 1) % vocab_size`` the runner-up."""
    scores = np.zeros(vocab_size, dtype=np.float32)
    scores[(7 * token + 1) % vocab_size] = 2.0
    scores[token] = 4.0
    out: np.ndarray = scores - np.log(np.exp(scores).sum(dtype=np.float32))
    return out


def reference_tokens(
    model: FakeModel, prompt: Sequence[int], max_tokens: int, stop_tokens: Sequence[int] = (0,)
) -> list[int]:
    """What ``model`` generates for ``prompt`` from an empty cache (FakeTokenizer's EOS
    is 0): the expected output of any cached turn with the same prompt."""
    gen = FakeBatchGenerator(model, stop_tokens=[[t] for t in stop_tokens])
    (uid,) = gen.insert([list(prompt)], max_tokens=[max_tokens])
    out: list[int] = []
    while True:
        _, responses = gen.next()
        for r in responses:
            assert r.uid == uid
            out.append(r.token)
            if r.finish_reason is not None:
                return out
