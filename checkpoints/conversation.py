"""Prompt formats of DeepSeek-OCR.

The OCR model is prompted in the "plain" format: the user's content alone, stripped, with no
role tags and no system prompt. The "deepseek" chat format is kept for prompts written for it.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    user_prefix: str = ""
    assistant_prefix: str = ""
    separator: str = ""


PROMPT_FORMATS = {
    "plain": PromptFormat(),
    "deepseek": PromptFormat(user_prefix="<|User|>: ", assistant_prefix="<|Assistant|>:", separator="\n\n"),
}


def format_prompt(user_content: str, format_name: str = "plain") -> str:
    """The text the model reads for one user turn, ready for tokenisation."""
    try:
        fmt = PROMPT_FORMATS[format_name]
    except KeyError:
        raise ValueError(f"unknown prompt format {format_name!r}; known: {sorted(PROMPT_FORMATS)}") from None
    content = user_content.strip()
    if not fmt.user_prefix:
        return content
    return (fmt.user_prefix + content + fmt.separator + fmt.assistant_prefix).strip()
