"""Provider presets for API teachers: where the API lives, which variable holds the key, what it can return,
and what it costs.

Prices are USD per million tokens as published by each provider; they change, so every price here can be
overridden in the recipe (``teacher.price_input``, ``teacher.price_cached_input``, ``teacher.price_output``)
and the table says when it was last checked. A paid provider's model with no known price is refused rather
than run with an unknown cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RecipeError
from ..recipe import SCORING_PROVIDERS, TeacherConfig
from .base import Price

__all__ = ["Price", "Preset", "PRESETS", "ANTHROPIC", "PRICES_CHECKED", "resolve_price"]

PRICES_CHECKED = "2025-11"


FREE = Price(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Preset:
    base_url: str
    key_env: str | None  # None: a local server that needs no key
    logprobs: bool  # returns top_logprobs on chat completions
    n: bool  # honours n > 1 in one call
    batch: bool = False  # has OpenAI's Batch API
    prices: dict[str, Price] = field(default_factory=dict)
    local: bool = False  # runs on the user's hardware; calls cost nothing per token
    # scores given tokens on its completions endpoint, and how (protege.recipe.SCORING_PROVIDERS says which do)
    scores: str | None = None


PRESETS: dict[str, Preset] = {
    "openai": Preset(
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
        logprobs=True,
        n=True,
        batch=True,
        prices={
            "gpt-4o": Price(2.50, 1.25, 10.00),
            "gpt-4o-mini": Price(0.15, 0.075, 0.60),
            "gpt-4.1": Price(2.00, 0.50, 8.00),
            "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
            "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
            "gpt-5": Price(1.25, 0.125, 10.00),
            "gpt-5-mini": Price(0.25, 0.025, 2.00),
            "gpt-5-nano": Price(0.05, 0.005, 0.40),
        },
    ),
    "deepseek": Preset(
        "https://api.deepseek.com/v1",
        "DEEPSEEK_API_KEY",
        logprobs=True,
        n=False,
        prices={"deepseek-chat": Price(0.28, 0.028, 0.42), "deepseek-reasoner": Price(0.28, 0.028, 0.42)},
    ),
    "moonshot": Preset(
        "https://api.moonshot.ai/v1",
        "MOONSHOT_API_KEY",
        logprobs=False,
        n=True,
        prices={"kimi-k2-0905-preview": Price(0.60, 0.15, 2.50), "kimi-k2-turbo-preview": Price(1.15, 0.15, 8.00)},
    ),
    "minimax": Preset(
        "https://api.minimax.io/v1",
        "MINIMAX_API_KEY",
        logprobs=False,
        n=False,
        prices={"MiniMax-M2": Price(0.30, 0.03, 1.20)},
    ),
    "openrouter": Preset("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY", logprobs=True, n=False),
    "together": Preset("https://api.together.xyz/v1", "TOGETHER_API_KEY", logprobs=True, n=True),
    "vllm": Preset("http://127.0.0.1:8000/v1", None, logprobs=True, n=True, local=True,
                   scores=SCORING_PROVIDERS["vllm"]),
    "llamacpp": Preset("http://127.0.0.1:8080/v1", None, logprobs=True, n=False, local=True,
                       scores=SCORING_PROVIDERS["llamacpp"]),
    "ollama": Preset("http://127.0.0.1:11434/v1", None, logprobs=False, n=False, local=True),
}

ANTHROPIC = Preset(
    "https://api.anthropic.com",
    "ANTHROPIC_API_KEY",
    logprobs=False,
    n=False,
    batch=True,
    prices={
        "claude-opus-4-1": Price(15.00, 1.50, 75.00),
        "claude-sonnet-4-5": Price(3.00, 0.30, 15.00),
        "claude-sonnet-4-0": Price(3.00, 0.30, 15.00),
        "claude-haiku-4-5": Price(1.00, 0.10, 5.00),
        "claude-3-5-haiku-latest": Price(0.80, 0.08, 4.00),
    },
)


def _lookup(table: dict[str, Price], model: str) -> Price | None:
    """Exact name first, then the longest listed name the model's dated id starts with
    (``gpt-4o-mini-2024-07-18`` costs what ``gpt-4o-mini`` costs)."""
    if model in table:
        return table[model]
    hits = [name for name in table if model.startswith(name + "-")]
    return table[max(hits, key=len)] if hits else None


def resolve_price(cfg: TeacherConfig, preset: Preset, provider: str, model: str) -> Price:
    """The recipe's prices over the table's; refuse a paid model whose price is unknown."""
    listed = FREE if preset.local else _lookup(preset.prices, model)
    given = (cfg.price_input, cfg.price_cached_input, cfg.price_output)
    if all(v is None for v in given):
        if listed is None:
            raise RecipeError(
                f"no price is known for {provider} model {model!r}; set teacher.price_input and "
                "teacher.price_output (USD per million tokens) from the provider's price page"
            )
        return listed
    base = listed or FREE
    if listed is None and (cfg.price_input is None or cfg.price_output is None):
        raise RecipeError(
            f"no price is known for {provider} model {model!r}; set both teacher.price_input and "
            "teacher.price_output (USD per million tokens)"
        )
    price_in = base.input if cfg.price_input is None else cfg.price_input
    cached = cfg.price_cached_input
    if cached is None:
        cached = base.cached_input if listed is not None and cfg.price_input is None else price_in
    return Price(price_in, cached, base.output if cfg.price_output is None else cfg.price_output)
