"""The model card names the preset it was built from (it once said `lab` whatever the preset)."""

from dsv3lab.train.card import model_card


class _Info(dict):
    """A run's numbers: the fields under test set, every other field 1 (the card formats them)."""
    def __missing__(self, key):
        return 1


def _card(preset):
    return model_card(_Info(preset=preset, sample="text", sample_t="text"))


def test_model_card_names_its_preset():
    assert "(preset `tiny`:" in _card("tiny")
    assert "(preset `lab`:" in _card("lab")
    assert "`lab`" not in _card("tiny")
