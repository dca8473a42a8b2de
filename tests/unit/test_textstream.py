"""Stop strings matched on streamed text: every split, overlaps, the very start, UTF-8."""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Sequence

import pytest

from kvpool.textstream import TextStream, first_stop, held_suffix


class _PieceDetokenizer:
    """mlx-lm's streaming detokenizer protocol over :class:`PieceTokenizer`."""

    def __init__(self, tokenizer: PieceTokenizer) -> None:
        self.tokenizer, self.tokens, self.offset = tokenizer, [], 0

    def add_token(self, token: int) -> None:
        self.tokens.append(token)

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        segment, self.offset = text[self.offset :], len(text)
        return segment


class PieceTokenizer:
    """Token ``i`` is ``pieces[i]`` (multi-character tokens)."""

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    @property
    def detokenizer(self) -> _PieceDetokenizer:
        return _PieceDetokenizer(self)


class _ByteDetokenizer:
    """Holds an incomplete UTF-8 sequence until its last byte arrives."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def add_token(self, token: int) -> None:
        self.pending += self.decoder.decode(bytes([token]))

    def finalize(self) -> None:
        self.pending += self.decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        segment, self.pending = self.pending, ""
        return segment


class ByteTokenizer:
    """One token per UTF-8 byte."""

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @property
    def detokenizer(self) -> _ByteDetokenizer:
        return _ByteDetokenizer()


def run(pieces: Sequence[str], stops: Sequence[str]) -> tuple[list[str], TextStream]:
    """Feed ``pieces`` as tokens (the last one final) until a stop matches."""
    tok = PieceTokenizer(pieces)
    stream = TextStream(tok, stops)
    out = []
    for i in range(len(pieces)):
        out.append(stream.add(i, final=i == len(pieces) - 1))
        if stream.stop is not None:
            break
    return out, stream


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``parts`` non-empty pieces."""
    out = []
    for cuts in itertools.combinations(range(1, len(text)), parts - 1):
        bounds = (0, *cuts, len(text))
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_a_stop_string_is_found_at_every_split_and_never_streamed(parts: int) -> None:
    text = "say hi\n\nbye"
    for pieces in splits(text, parts):
        out, stream = run(pieces, ["\n\n"])
        assert stream.stop == "\n\n", pieces
        assert "".join(out) == stream.text == "say hi", pieces
        # nothing of the stop text was released, at any point
        assert all("\n" not in piece for piece in out), (pieces, out)


def test_a_partial_match_is_held_then_released_when_it_fails() -> None:
    out, stream = run(["a\n", "b", "\n", "\nc"], ["\n\n"])
    assert out == ["a", "\nb", "", ""]  # "\n" held twice; the second time it matched
    assert stream.stop == "\n\n" and stream.text == "a\nb"


def test_held_text_is_released_at_the_end() -> None:
    out, stream = run(["x", "ST"], ["STOP"])
    assert out == ["x", "ST"] and stream.stop is None and stream.text == "xST"


def test_overlapping_candidates_the_earliest_match_wins() -> None:
    # "abcd" and "bc": "bc" completes first, at position 1
    out, stream = run(["a", "b", "c", "d"], ["abcd", "bc"])
    assert stream.stop == "bc" and "".join(out) == "a"
    # at the same position the longest stop that matched names it
    assert first_stop("xabc", ["ab", "abc"]) == (1, "abc")
    # a stop whose prefix repeats: "aab" in "aaab"
    out, stream = run(["a", "a", "a", "b"], ["aab"])
    assert stream.stop == "aab" and "".join(out) == "a"


def test_a_stop_at_the_very_start_gives_empty_text() -> None:
    out, stream = run(["\n\n", "more"], ["\n\n"])
    assert out == [""] and stream.text == "" and stream.stop == "\n\n"
    assert stream.tokens_in_text() == 0


def test_a_stop_inside_one_token_cuts_that_token() -> None:
    out, stream = run(["one two", " three"], [" tw"])
    assert out == ["one"] and stream.tokens_in_text() == 1


def test_tokens_in_text_counts_the_tokens_the_text_shows() -> None:
    _, stream = run(["ab", "c\n", "\nzz"], ["\n\n"])
    assert stream.text == "abc" and stream.tokens_in_text() == 2
    _, stream = run(["ab", "c", "\n\n"], ["\n\n"])
    assert stream.text == "abc" and stream.tokens_in_text() == 2


def test_unicode_that_decodes_across_tokens() -> None:
    data = "caf\u00e9!\u00e9\u00e9".encode()  # é is two bytes
    stream = TextStream(ByteTokenizer(), ["\u00e9!"])
    out = []
    for i, byte in enumerate(data):
        out.append(stream.add(byte, final=i == len(data) - 1))
        if stream.stop is not None:
            break
    assert stream.stop == "\u00e9!" and "".join(out) == stream.text == "caf"
    # no stops: the text is the whole decode, released as characters complete
    stream = TextStream(ByteTokenizer())
    pieces = [stream.add(b, final=i == len(data) - 1) for i, b in enumerate(data)]
    assert "".join(pieces) == data.decode() and "" in pieces


def test_a_token_without_text_ends_the_stream() -> None:
    tok = PieceTokenizer(["ab", "<eos>"])
    stream = TextStream(tok, ["b!"])
    assert stream.add(0) == "a"  # "b" could start "b!"
    assert stream.add(1, final=True, is_text=False) == "b"
    assert stream.text == "ab" and stream.stop is None and stream.tokens_in_text() == 1


def test_the_first_text_is_the_decoded_text() -> None:
    class DropsLeadingSpace(PieceTokenizer):
        @property
        def detokenizer(self) -> _PieceDetokenizer:
            inner = _PieceDetokenizer(self)
            inner.offset = 1  # like mlx-lm's: the first token's leading space is trimmed
            return inner

    tok = DropsLeadingSpace([" Hi", " there"])
    stream = TextStream(tok)
    assert stream.add(0) + stream.add(1, final=True) == " Hi there" == stream.text


def test_held_suffix_and_bad_stops() -> None:
    assert held_suffix("abc\n", ["\n\n"]) == 1
    assert held_suffix("abST", ["STOP", "T"]) == 2
    assert held_suffix("abc", ["xyz"]) == 0
    with pytest.raises(ValueError, match="empty"):
        TextStream(PieceTokenizer([]), [""])
