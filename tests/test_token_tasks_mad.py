"""MAD's six synthetic tasks and induction heads (lra/tasks/mad.py, lra/tasks/induction.py).

Each generator is checked against a checker written here from the task's definition (the
MAD paper and its generators; the Mamba paper and safari's), reading only the arrays.
"""

import numpy as np
import pytest

from lra import tasks
from lra.tasks.token_tasks import UNSCORED, split_rng

MAD = ("in_context_recall", "fuzzy_recall", "noisy_recall", "selective_copying",
       "compression", "memorization")
ALL = MAD + ("induction_heads",)


def draw(name, split="train", count=300, seed=0, **given):
    """(inputs, lengths, targets) of `count` examples of `split`, as prepare draws them."""
    task = tasks.get(name)
    settings = task.settings({"seed": seed, **given})
    own = task.split_settings(split, settings)
    return task.generate(count, own, split_rng(name, seed, split))


def scored(targets_row):
    return np.flatnonzero(targets_row != UNSCORED)


# -- in-context recall, noisy recall -----------------------------------------------------


def check_recall_row(inputs, targets, keys, values, multi=True, noise=()):
    """The sequence is key-value pairs (or noise pairs) then a final query key; a test target
    sits at each key whose key came before (multi-query) and at the final key, and is the
    value that followed that key earlier."""
    seen, expected = {}, {}
    body = len(inputs) - (1 if multi else 2)  # the final query (and copy prefix)
    for start in range(0, body, 2):
        key, value = inputs[start], inputs[start + 1]
        if key in noise:
            assert value in noise  # noise comes in pairs
            continue
        assert key in keys and value in values
        if key in seen:
            assert seen[key] == value  # a key keeps its value within a sequence
            if multi:
                expected[start] = value
        seen[key] = value
    if not multi:
        assert inputs[-2] == max(values) + 1  # the copy prefix (top id)
    query = inputs[-1]
    assert query in seen  # the final query asks for a key shown before
    expected[len(inputs) - 1] = seen[query]
    assert {int(i): int(targets[i]) for i in scored(targets)} == {
        int(i): int(v) for i, v in expected.items()}


@pytest.mark.parametrize("multi", [True, False])
def test_in_context_recall_targets_are_earlier_values(multi):
    inputs, lengths, targets = draw("in_context_recall", "test", multi_query=multi)
    assert inputs.shape == (300, 127 if multi else 128) and (lengths == inputs.shape[1]).all()
    plain = 16 if multi else 15  # single-query: the top id is the copy prefix
    for row, target in zip(inputs, targets):
        check_recall_row(row.tolist(), target, set(range(plain // 2)),
                         set(range(plain // 2, plain)), multi)


def test_recall_training_split_scores_every_next_token():
    for name in ("in_context_recall", "noisy_recall", "fuzzy_recall"):
        inputs, _, targets = draw(name, "train", count=50)
        assert (targets != UNSCORED).all()
        assert (targets[:, :-1] == inputs[:, 1:]).all()  # the output at t predicts t + 1
        val_targets = draw(name, "val", count=50)[2]
        assert (val_targets == UNSCORED).any(axis=1).all()  # validation scores as test


def test_noisy_recall_noise_comes_from_the_noise_vocabulary():
    inputs, _, targets = draw("noisy_recall", "test")
    noise = set(range(16, 32))
    for row, target in zip(inputs, targets):
        check_recall_row(row.tolist(), target, set(range(8)), set(range(8, 16)), noise=noise)
        assert not any(row[i] in noise for i in scored(target))
    body = inputs[:, :-1]  # the final query is never noise
    fraction = np.isin(body, list(noise)).mean()
    assert 0.17 < fraction < 0.23  # frac_noise 0.2 of the pairs


# -- fuzzy recall ------------------------------------------------------------------------


def motifs(tokens, kind):
    """(position, run) of the maximal runs of tokens of one kind (key, value, noise, ...)."""
    out = []
    for position, token in enumerate(tokens):
        if out and kind(out[-1][1][-1]) == kind(token):
            out[-1][1].append(token)
        else:
            out.append((position, [token]))
    return [(position, tuple(run)) for position, run in out]


@pytest.mark.parametrize("given", [{}, {"vocab_size": 40, "multi_query": False,
                                        "k_motif_size": 2, "noise_vocab_size": 8,
                                        "frac_noise": 0.3}])
def test_fuzzy_recall_values_follow_their_key_motifs(given):
    """Keys and values are motifs of distinct tokens (test keys: k_motif_size long); a test
    target is each value token of a key motif shown before, and the final value."""
    inputs, lengths, targets = draw("fuzzy_recall", "test", **given)
    vocab, multi = given.get("vocab_size", 16), given.get("multi_query", True)
    km, vm = given.get("k_motif_size", 3), 3
    pad = vocab - 1 if multi else vocab - 2
    plain = pad - given.get("noise_vocab_size", 0)
    kind = lambda token: ("key" if token < plain // 2 else "value" if token < plain else
                          "noise" if token < pad else token)  # pad and copy: their own
    assert inputs.shape == (300, 128) and (lengths == 128).all()
    unshown = 0
    for row, target in zip(inputs, targets):
        full = row.tolist() + [int(target[-1])]  # the shifted-off last token is a target
        runs = motifs(full, kind)
        if runs[0][1][0] == pad:  # padding on the left only
            runs = runs[1:]
        pairs, items = [], iter(runs)
        for position, run in items:
            assert pad not in run
            if kind(run[0]) in ("noise", vocab - 1):  # noise; the copy prefix
                continue
            assert kind(run[0]) == "key" and len(run) == km and len(set(run)) == km
            value_at, value = next(items)
            assert kind(value[0]) == "value" and 1 <= len(value) <= vm
            assert len(set(value)) == len(value)
            pairs.append((run, value, value_at))
        if not multi:
            assert full[pairs[-1][2] - km - 1] == vocab - 1  # the copy prefix, then the query
        *body, (query, answer, answer_at) = pairs
        seen, expected = {}, set(range(answer_at, answer_at + len(answer)))
        for key, value, value_at in body:
            if key in seen:
                assert seen[key] == value  # a key keeps its value
                if multi:
                    expected.update(range(value_at, value_at + len(value)))
            seen.setdefault(key, value)
        if query in seen:
            assert seen[query] == answer
        else:
            unshown += 1  # MAD: the probe pair can miss its slot (see lra/tasks/mad.py)
        assert set((scored(target) + 1).tolist()) == expected  # target at t: token t + 1
        assert all(full[i] == target[i - 1] for i in expected)
    assert unshown < 0.06 * len(inputs)


# -- selective copying, compression, memorization ----------------------------------------


def test_selective_copying_targets_are_the_data_tokens_in_order():
    inputs, lengths, targets = draw("selective_copying", "train")
    blank, copy, copies = 14, 15, 16
    assert inputs.shape == (300, 256) and (lengths == 256).all()
    for row, target in zip(inputs, targets):
        (copy_at,) = np.flatnonzero(row == copy)
        assert copy_at == 256 - copies - 1
        data = [t for t in row[:copy_at] if t != blank]
        assert len(data) == copies and row[copy_at - 1] != blank  # MAD inserts before tokens
        assert (row[copy_at + 1:] == blank).all()
        assert scored(target).tolist() == list(range(copy_at + 1, 256))
        assert target[copy_at + 1:].tolist() == data


def test_compression_reads_the_sequence_back_after_the_compression_token():
    inputs, lengths, targets = draw("compression", "train")
    length, token = 32, 15
    assert inputs.shape == (300, 2 * length - 1) and (lengths == 2 * length - 1).all()
    assert (inputs[:, :length - 1] < token).all() and (inputs[:, length - 1:] == token).all()
    assert (targets[:, :length - 1] == UNSCORED).all()
    assert (targets[:, length - 1:] == inputs[:, :length]).all()


def memory_of(inputs, targets, insert=255):
    """key -> value read off the examples: each scored insert token's key is before it."""
    table = {}
    for row, target in zip(inputs, targets):
        assert scored(target).tolist() == np.flatnonzero(row == insert).tolist()
        for i in scored(target):
            assert i % 2 == 1
            assert table.setdefault(int(row[i - 1]), int(target[i])) == target[i]
    return table


def test_memorization_targets_come_from_one_table_shared_by_the_splits():
    train = memory_of(*draw("memorization", "train", count=256)[::2])
    test = memory_of(*draw("memorization", "test", count=1280)[::2])
    assert set(train) <= set(range(127)) and set(train.values()) <= set(range(127, 255))
    assert len(set(test.values())) == len(test)  # distinct keys, distinct values
    assert len(test) == 127 and all(train[key] == test[key] for key in train)
    other = memory_of(*draw("memorization", "test", count=1280, seed=1)[::2])
    assert other != test  # another seed, another table


# -- induction heads ---------------------------------------------------------------------


def test_induction_heads_target_is_the_token_after_the_first_special_token():
    special = 15
    for split, length in (("train", 256), ("val", 256), ("test", 1024)):
        inputs, lengths, targets = draw("induction_heads", split, count=200)
        assert inputs.shape == (200, length) and (lengths == length).all()
        for row, target in zip(inputs, targets):
            at = np.flatnonzero(row == special)
            assert len(at) == 2 and at[1] == length - 1 and at[0] < length - 3
            assert (row[row != special] < 14).all()  # id 14: safari's unused no-op
            assert scored(target).tolist() == [length - 1]
            assert target[-1] == row[at[0] + 1]


# -- every task --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_data_other_seed_other_data(name):
    first, again, other = draw(name, count=20), draw(name, count=20), draw(name, count=20, seed=1)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == other[0]).all()


@pytest.mark.parametrize("name", ALL)
def test_max_targets_is_the_most_scored_positions_of_an_example(name):
    task = tasks.get(name)
    most = max(int((draw(name, split, count=200)[2] != UNSCORED).sum(1).max())
               for split in ("train", "val", "test"))
    assert most == task.max_targets_for()


@pytest.mark.parametrize("name", ALL)
def test_prepare_and_load_round_trip(name, tmp_path):
    task = tasks.get(name)
    counts = {"num_train": 6, "num_val": 3, "num_test": 4}
    manifest = task.prepare(tmp_path, **counts)
    assert task.is_prepared(tmp_path) and manifest["counts"] == {"train": 6, "val": 3, "test": 4}
    for split in ("train", "val", "test"):
        loaded = task.load(split, tmp_path)
        expected = draw(name, split, count=counts["num_" + split])
        for key, array in zip(("inputs", "lengths", "targets"), expected):
            assert loaded[key].dtype == np.int32 and (loaded[key] == array).all(), (split, key)
    assert task.prepare(tmp_path, **counts) == manifest  # prepared already
    with pytest.raises(ValueError, match="other settings"):
        task.prepare(tmp_path, **{**counts, "num_train": 7})


def test_ten_thousand_examples_take_seconds():
    import time
    for name in MAD:
        start = time.perf_counter()
        draw(name, "test", count=10_000)
        assert time.perf_counter() - start < 5, name


@pytest.mark.parametrize("name, given, message", [
    ("in_context_recall", {"seq_len": 127}, "even"),
    ("noisy_recall", {"frac_noise": 1.0}, "frac_noise"),
    ("noisy_recall", {"noise_vocab_size": 0}, "noise_vocab_size"),
    ("fuzzy_recall", {"vocab_size": 6}, "key and"),
    ("selective_copying", {"num_tokens_to_copy": 200}, "seq_len >"),
    ("induction_heads", {"vocab_size": 2}, "vocab_size"),
])
def test_impossible_settings_are_refused(name, given, message):
    with pytest.raises(ValueError, match=message):
        tasks.get(name).settings(given)
