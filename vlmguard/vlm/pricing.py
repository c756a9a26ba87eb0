"""What the model requests cost, from each provider's list prices (for the console).

Input (prompt) and output are priced apart: output, thinking included, costs several
times input (Gemini 3.8 Flash: $0.75 and $3.75 per million, read 2026-10). A provider
without prices of its own uses analysis.price_per_million_tokens for both, as before.
"""

from __future__ import annotations

from typing import Any


def prices(settings: Any, fallback: float) -> tuple[float, float]:
    """(input, output) per million tokens for a provider; (0, 0): not known."""
    given = (settings.price_input_per_million, settings.price_output_per_million)
    return given if any(given) else (fallback, fallback)


def cost_report(providers: tuple[Any, ...], usage: dict[str, dict[str, int]],
                fallback: float = 0.0) -> dict[str, dict[str, Any]]:
    """Per provider with usage: input and output tokens (thoughts billed as output), the
    prices, and the cost (None when no price is set)."""
    out = {}
    for settings in providers:
        used = usage.get(settings.name)
        if not used:
            continue
        price_in, price_out = prices(settings, fallback)
        output = used["output"] + used["thoughts"]
        out[settings.name] = {
            "input_tokens": used["prompt"], "output_tokens": output,
            "price_input_per_million": price_in, "price_output_per_million": price_out,
            "cost": (round(used["prompt"] / 1e6 * price_in + output / 1e6 * price_out, 6)
                     if price_in or price_out else None)}
    return out
