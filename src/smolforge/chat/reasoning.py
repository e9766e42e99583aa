"""Split a reply into its reasoning (`<think>...</think>`) and its answer, whole or streamed.

Hybrid-reasoning models (SmolLM3, Qwen3) write their reasoning between `<think>` and
`</think>` before the answer. Chat front ends show it apart (dimmed in `smolforge chat`, the
`reasoning_content` field of the OpenAI-style API), and scoring ignores it (playbook ch. 07).
Some templates open the block in the generation prompt itself (Qwen3 with thinking on), so the
reply starts inside it: `prompt_opens_think` tells whether a rendered prompt left one open.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """Does the rendered prompt end inside an unclosed `<think>` block?"""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def split_reasoning(reply: str, in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning is None when the reply has no block.

    `in_think`: the reply starts inside a block the prompt opened. A block never closed holds
    everything after its opening: the model was still reasoning when it stopped, no answer.
    """
    splitter = ReasoningSplitter(in_think)
    reasoning, answer = splitter.feed(reply)
    more_reasoning, more_answer = splitter.finish()
    reasoning, answer = reasoning + more_reasoning, answer + more_answer
    if not splitter.saw_block:
        return None, answer
    return reasoning.strip(), answer.lstrip()


class ReasoningSplitter:
    """Incremental `split_reasoning` for streams: `feed` text pieces as they arrive and get
    (reasoning_delta, answer_delta) back. A piece that may be the start of a tag is held back
    until the next piece (or `finish`) shows whether it is one, so a tag cut across two stream
    deltas never leaks into the output.

    Only a tag at the start of the reply (leading whitespace aside) opens a block: a later
    `<think>` in the answer is ordinary text.
    """

    def __init__(self, in_think: bool = False) -> None:
        self.in_think = in_think
        self.saw_block = in_think
        self._answer_started = in_think  # nothing can open a block after the answer starts
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = answer = ""
        while self._pending:
            if self.in_think:
                close = self._pending.find(THINK_CLOSE)
                if close == -1:
                    keep = _partial_tag_suffix(self._pending, THINK_CLOSE)
                    reasoning += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                reasoning += self._pending[:close]
                self._pending = self._pending[close + len(THINK_CLOSE):]
                self.in_think, self._answer_started = False, True
                continue
            if not self._answer_started:
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._pending = stripped[len(THINK_OPEN):]
                    self.in_think = self.saw_block = True
                    continue
                if stripped and THINK_OPEN.startswith(stripped):
                    break  # maybe the start of "<think>": wait for more text
                if not stripped:
                    break  # only whitespace so far: it may precede a block
                self._answer_started = True
            answer += self._pending
            self._pending = ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """Whatever was held back, once the stream has ended."""
        rest, self._pending = self._pending, ""
        return (rest, "") if self.in_think else ("", rest)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
