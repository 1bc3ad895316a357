"""The automatic batch size: the same choice on a busy machine as on an idle one."""

import itertools

import pytest

from apostate.scoring import calibration

# Seconds of (prompt pass, decoding step) per batch size, as an idle machine measures them; its
# rates (32-token responses/s) climb to a plateau at 16-32, and 50 is clearly slower.
IDLE = {1: (0.3, 0.15), 2: (0.5, 0.2), 4: (0.8, 0.2), 8: (1.2, 0.22), 16: (2.0, 0.25), 32: (3.5, 0.39), 50: (8.0, 0.9)}


def choice(monkeypatch, load) -> int:
    """find_batch_size's choice where each timing is slowed by the next factor of `load`."""
    factors = iter(load)

    def timed(model, tokenizer, texts, new_tokens, device, kernels):
        prompt, step = IDLE[len(texts)]
        return (prompt + (new_tokens - 1) * step) * next(factors)

    monkeypatch.setattr(calibration, "_timed", timed)
    return calibration.find_batch_size(None, None, ["text"] * 50, 64, "cpu", 32)


def test_idle_machine_takes_the_largest_size_of_the_fastest_plateau(monkeypatch):
    assert choice(monkeypatch, itertools.repeat(1.0)) == 32


@pytest.mark.parametrize(
    "load",
    [
        itertools.repeat(1.8),  # busy all along
        itertools.chain([1.0] * 5, [3.0, 3.0], itertools.repeat(1.0)),  # a burst while size 4 is timed
        itertools.cycle([1.0, 1.08, 1.03, 1.1, 1.0]),  # noise of a few percent
        itertools.chain([1.0] * 9, [2.5, 2.5], itertools.repeat(1.0)),  # a burst while size 16 is timed
    ],
)
def test_a_busy_machine_chooses_what_an_idle_one_does(monkeypatch, load):
    assert choice(monkeypatch, load) == 32


def test_a_burst_no_longer_ends_the_search_at_a_tiny_size(monkeypatch):
    """Before: one slow timing of size 4 ended the search there, and the run decoded 2 at a time."""
    load = itertools.chain([1.0] * 5, [3.0, 3.0], itertools.repeat(1.0))  # warm-up, sizes 1 and 2, then 4
    rates = []
    monkeypatch.setattr(calibration, "choose_batch_size", lambda measured: rates.append(measured) or 0)
    choice(monkeypatch, load)
    assert sorted(rates[0]) == [1, 2, 4, 8, 16, 32, 50]


def test_a_slow_models_rates_are_printed_with_their_digits(monkeypatch, capsys):
    """A 1.5B model on two cores makes well under 0.1 responses/s at small sizes: "0.0" hid them."""
    monkeypatch.setattr(calibration, "_timed", lambda model, tokenizer, texts, new_tokens, *_: 30.0 * new_tokens)
    calibration.find_batch_size(None, None, ["text"] * 2, 2, "cpu", 32)
    printed = capsys.readouterr().err
    assert "batch size 1: 0.00101 responses/s" in printed and "0.0 responses" not in printed
