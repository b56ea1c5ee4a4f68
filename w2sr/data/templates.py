"""Prompt templates: how a problem becomes the chat messages a model sees.

Generation, SFT and evaluation all render prompts here, so a student is trained and tested on
exactly the text its teacher was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from w2sr.grading import THINK_OPEN


@dataclass(frozen=True)
class Template:
    user: str
    system: str | None = None

    def messages(self, problem: str) -> list[dict[str, str]]:
        user = {"role": "user", "content": self.user.format(problem=problem)}
        return [{"role": "system", "content": self.system}, user] if self.system else [user]

    def render(self, tokenizer, problem: str, thinking: bool | None = None) -> str:
        """The prompt text a model sees: its chat template on these messages, ready to answer,
        with thinking on or off where the template has the switch (None: its default)."""
        switch = {} if thinking is None else {"enable_thinking": thinking}
        return tokenizer.apply_chat_template(
            self.messages(problem), tokenize=False, add_generation_prompt=True, **switch
        )


def reasoning_prefill(prompt: str) -> str:
    """What a chat template wrote of the answer itself: the opening `<think>` (and the blank
    after it) that reasoning models' templates put at the end of the prompt. A response is
    stored and graded with it in front, so an unclosed thought reads as one."""
    at = prompt.rfind(THINK_OPEN)
    if at < 0 or prompt[at + len(THINK_OPEN) :].strip():
        return ""
    return prompt[at:]


TEMPLATES: dict[str, Template] = {
    # SimpleRL-Zoo's template, used by the W2SR paper for teachers and students alike.
    "paper": Template(
        system="You are a helpful assistant.",
        user="{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    ),
    "no_system": Template(
        user="{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    ),
    # The bare problem, for models whose chat template or task carries its own format.
    "plain": Template(user="{problem}"),
}
