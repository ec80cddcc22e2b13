"""Chat rendering for SFT: a conversation -> token ids and the mask of the tokens that carry loss.

One code path for every chat template. The loss spans are character ranges of the rendered text: the ones
the template marks with {% generation %}, or, for templates without markers (most hub tokenizers), the ones
found by rendering each conversation prefix. Tokens get the mask by exactly the rule of transformers'
`return_assistant_tokens_mask`, so both kinds of template give the same masks. Message content is encoded
as plain text; only the template's own markers are special tokens. Every function here is pure (no shared
state), so it can run inside datasets.map workers.
"""
from __future__ import annotations

import functools
import re

from lmtrain.data.sources import DataError
from lmtrain.errors import UserError


class RecordProblem(DataError):
    """A conversation that cannot become a training sample; `reason` is the key it is counted under when
    lenient. Raised by the per-sample functions, which never touch shared state (they run in datasets.map)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Content is encoded as plain text: a special-token string inside a message ("<|im_end|>" in an answer about
# chat formats) must not become the real token, or the model learns to stop mid-answer and user text can
# fake a turn. Only the markers the template itself writes are special. Content occurrences are wrapped in
# two Unicode noncharacters (reserved for internal use) before rendering, so they can be found again in the
# rendered text whatever the template does around them (trim, concatenation).
_LITERAL_START, _LITERAL_END = "\ufdd0", "\ufdd1"


def _special_strings(tokenizer) -> tuple[str, ...]:
    """The special added tokens: what `encode_special_tokens=True` (as pretraining encodes) turns into text."""
    return tuple(sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
                        key=len, reverse=True))


@functools.lru_cache(maxsize=64)
def _pattern(strings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, strings)) or "(?!)")


def _mark_literals(messages: list[dict], specials: re.Pattern) -> tuple[list[dict], bool]:
    marked, any_marked = [], False
    for m in messages:
        content = m["content"]
        if specials.search(content):
            if _LITERAL_START in content or _LITERAL_END in content:
                raise RecordProblem("bad_format", "message content holds the noncharacters U+FDD0/U+FDD1")
            content, any_marked = specials.sub(lambda x: _LITERAL_START + x.group(0) + _LITERAL_END, content), True
        marked.append({**m, "content": content})
    return marked, any_marked


def _unmark(text: str, specials: re.Pattern) -> tuple[str, list[tuple[int, int]], list[int]]:
    """Rendered text with markers -> (clean text, literal char ranges in it, marked->clean position map)."""
    markers = re.compile(f"{_LITERAL_START}({specials.pattern}){_LITERAL_END}|[{_LITERAL_START}{_LITERAL_END}]")
    clean, literals, position = [], [], [0] * (len(text) + 1)
    cursor = length = 0
    for match in markers.finditer(text):
        clean.append(text[cursor:match.start()])
        for p in range(cursor, match.start() + 1):
            position[p] = length + p - cursor
        length += match.start() - cursor
        if match.group(1) is not None:  # a whole marked special string; a lone marker is just dropped
            clean.append(match.group(1))
            literals.append((length, length + len(match.group(1))))
            for p in range(match.start() + 1, match.end()):
                position[p] = length + min(p - match.start() - 1, len(match.group(1)))
            length += len(match.group(1))
        cursor = match.end()
    clean.append(text[cursor:])
    for p in range(cursor, len(text) + 1):
        position[p] = length + p - cursor
    return "".join(clean), literals, position


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, spans: bool = False):
    """apply_chat_template(tokenize=False), plus the {% generation %} char spans when `spans`."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as apply_chat_template does
    try:
        rendered, indices = render_jinja_template(
            conversations=[messages], chat_template=tokenizer.get_chat_template(),
            return_assistant_tokens_mask=spans, add_generation_prompt=add_generation_prompt,
            **tokenizer.special_tokens_map)
    except jinja2.TemplateError as err:
        raise RecordProblem("template_rejected", f"the chat template rejects this conversation ({err})") from None
    return rendered[0], (indices[0] if spans else None)


def has_generation_markers(tokenizer) -> bool:
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""))


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the char spans that carry loss.

    With {% generation %} markers: the spans the template marks. Without (most hub templates): from the end
    of the generation prompt (the conversation before the answer rendered with add_generation_prompt=True)
    to the end of the assistant's turn without trailing whitespace, so the turn's end token is trained and
    the newline after it is not. This needs (as every common template satisfies) that rendering a
    conversation starts with the rendering of each of its prefixes."""
    if has_generation_markers(tokenizer):
        return _render(tokenizer, messages, spans=True)
    text, _ = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, _ = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ("", None)
        upto = text if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1])[0]  # one render less
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise UserError("the chat template renders a conversation's prefixes inconsistently, so the answers "
                            "cannot be located; add {% generation %} ... {% endgeneration %} around what the "
                            "assistant writes (its content and end-of-turn token) in the template")
        spans.append((len(prefix), len(prefix) + len(upto[len(prefix):].rstrip())))
    return text, spans


def _encode(tokenizer, text: str, literals: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and char offsets of `text`, special strings inside the `literals` ranges encoded as text.

    The tokenizer cuts its input at special tokens and encodes each piece between them on its own, so only
    the pieces holding a literal are re-encoded (with encode_special_tokens=True, as pretraining does); the
    rest stays exactly what encoding the whole text gives."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not literals:
        return ids, offsets
    special_ids = set(tokenizer.convert_tokens_to_ids(list(_special_strings(tokenizer))))
    inside = lambda a, b: any(s <= a and b <= e for s, e in literals)  # noqa: E731
    cuts = [i for i, (t, (a, b)) in enumerate(zip(ids, offsets)) if t in special_ids and not inside(a, b)]
    backend = tokenizer.backend_tokenizer
    out_ids, out_offsets, previous = [], [], -1
    for cut in cuts + [len(ids)]:
        start = offsets[previous][1] if previous >= 0 else 0
        stop = offsets[cut][0] if cut < len(ids) else len(text)
        if any(s < stop and start < e for s, e in literals):
            saved, backend.encode_special_tokens = backend.encode_special_tokens, True
            try:
                piece = backend.encode(text[start:stop], add_special_tokens=False)
            finally:
                backend.encode_special_tokens = saved
            out_ids += piece.ids
            out_offsets += [(start + a, start + b) for a, b in piece.offsets]
        else:
            out_ids += ids[previous + 1:cut]
            out_offsets += offsets[previous + 1:cut]
        if cut < len(ids):
            out_ids.append(ids[cut])
            out_offsets.append(offsets[cut])
        previous = cut
    return out_ids, out_offsets


def _char_to_token(offsets: list[tuple[int, int]], char: int) -> int | None:
    return next((i for i, (a, b) in enumerate(offsets) if a <= char < b), None)


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Exactly transformers' return_assistant_tokens_mask rule: every token from the one holding a span's
    first character to the one holding its last is trained, so a token that straddles the span start (the
    prompt's trailing space with the answer's first letters, "ASSISTANT:" + " Hell") is trained."""
    mask = [0] * len(offsets)
    for start, end in spans:
        first, last = _char_to_token(offsets, start), _char_to_token(offsets, end - 1)
        if first is None:
            break
        for i in range(first, last + 1 if last else len(offsets)):
            mask[i] = 1
    return mask


def render_text(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(rendered text, char spans that carry loss, char ranges of special strings that are content).
    With no such literal, encoding the text as one piece is exact, so callers may batch-encode it."""
    specials = _pattern(_special_strings(tokenizer))
    marked, any_marked = _mark_literals(messages, specials)
    text, spans = assistant_spans(tokenizer, marked)
    literals = []
    if any_marked:
        text, literals, position = _unmark(text, specials)
        spans = [(position[a], position[b]) for a, b in spans]
    return text, spans, literals


def mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """_mask_from_spans on NumPy (a bool array; the batched path's hot loop): the same first-token-holding-
    the-char rule, the same open end when the last char is in no token (or in token 0)."""
    import numpy as np

    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    mask = np.zeros(len(bounds), dtype=bool)

    def holding(char: int) -> int | None:
        hit = np.flatnonzero((starts <= char) & (char < ends))
        return int(hit[0]) if len(hit) else None

    for start, end in spans:
        first, last = holding(start), holding(end - 1)
        if first is None:
            break
        mask[first:last + 1 if last else len(bounds)] = True
    return mask


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1: the token carries loss), the same with and without
    {% generation %} markers; special-token strings inside message content are encoded as plain text."""
    text, spans, literals = render_text(tokenizer, messages)
    ids, offsets = _encode(tokenizer, text, literals)
    return ids, _mask_from_spans(offsets, spans)
