"""How a referring sentence becomes the LLM's token ids: the fixed svp templates, in the LLM's own format.

A chat LLM (Qwen2.5, Llama-3-Instruct, Vicuna-style LLaVA bases) was tuned on its chat template;
feeding it a bare prompt throws away what that tuning taught it about whose turn it is. So when the
tokenizer carries a ``chat_template`` the prompt is the user turn and the answer the assistant turn,
both rendered by the template (as Hugging Face's ``apply_chat_template`` does for any chat model);
a base LLM without one gets the plain templates, with its own special tokens (BOS) around them.

The answer is the same for every sample, so its ids are computed once: the assistant turn is the
rendered conversation minus the rendered generation prompt. Its ids (``[SEG]`` among them, and the
end-of-turn / EOS token that closes it) are what the CE loss trains.
"""

from __future__ import annotations

from typing import Any

from pipeline.vision_model import ModelLoadError

SEG_TOKEN, IMAGE_TOKEN = "[SEG]", "<image>"
PROMPT = "please segment : {sentence} . " + IMAGE_TOKEN + " answer :"
ANSWER = "it is " + SEG_TOKEN + " ."
CHAT_DATE = "26 Jul 2024"


class PromptFormat:
    """Prompt ids per sentence and the fixed answer ids, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            probe = self._user_turn("x")
            generation_prompt = self._render(probe, add_generation_prompt=True)
            conversation = self._render([*probe, {"role": "assistant", "content": ANSWER}])
            if not conversation.startswith(generation_prompt):
                raise ModelLoadError("the tokenizer's chat template renders the assistant turn in a way svp cannot "
                                 "separate from the prompt (the conversation does not start with the generation "
                                 "prompt)")
            self.answer_ids = tokenizer(conversation[len(generation_prompt):], add_special_tokens=False)["input_ids"]
        else:
            answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
            eos = tokenizer.eos_token_id
            self.answer_ids = answer + ([eos] if eos is not None else [])

    def prompt_ids(self, sentences: list[str]) -> list[list[int]]:
        """The prompt of each sentence, ``<image>`` still in it, as the LLM's input ids."""
        prompts = [PROMPT.format(sentence=sentence) for sentence in sentences]
        if not self.chat:
            return self.tokenizer(prompts)["input_ids"]
        texts = [self._render(self._user_turn(p), add_generation_prompt=True) for p in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template has its own specials

    @staticmethod
    def _user_turn(content: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": content}]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text; a fixed ``date_string`` (Llama 3's own fallback), since templates that
        print today's date would otherwise give training, eval and resume on other days other prompts."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  date_string=CHAT_DATE)
