"""The other tasks of ``conveyor train``: next-frame prediction of piano rolls (``--task music``) and text
classification with a bidirectional layer (``--task classify``): data readers, gradients by finite
differences in float64, exact padding and bucketing, learning, and exact resumption through the command."""

import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conveyor.train import ClassifyTask, Config, MusicTask, UsageError, checkpoint, run
from conveyor.train.classify import order_dataset, words_of
from conveyor.train.music import KEYS, LOWEST_NOTE, load_rolls

MUSIC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "polyphonic_music"


def write_music_pickle(path, seed=0, pieces=(12, 4, 4)):
    """A Boulanger-Lewandowski-style pickle: {split: [piece: [frame: [MIDI notes]]]}, with structure to
    learn (each piece walks a chord up the keyboard)."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "valid", "test"), pieces):
        songs = []
        for _ in range(n):
            root, length = int(rng.integers(40, 60)), int(rng.integers(6, 20))
            songs.append([[root + (t % 12), root + 4 + (t % 12), root + 7 + (t % 12)] for t in range(length)])
        data[split] = songs
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def music_task(path, **overrides):
    options = dict(task="music", data=path, cell="lstm", hidden=12, batch=4, lr=1e-2, epochs=1, eval_every=0,
                   eval_batch=3, seed=2)
    options.update(overrides)
    return MusicTask(MusicTask.defaults(Config(**options)))


def finite_difference_check(task, loss, grads, names, rng, eps=1e-6):
    params = task.params()
    assert set(grads) == set(params)
    for name in names:
        p = params[name]
        for _ in range(3):
            index = tuple(int(rng.integers(n)) for n in p.shape)
            old = p[index]
            p[index] = old + eps
            up = loss()
            p[index] = old - eps
            down = loss()
            p[index] = old
            fd = (up - down) / (2 * eps)
            assert abs(grads[name][index] - fd) <= 1e-7 + 1e-5 * abs(fd), (name, index, fd)


# ---------------------------------------------------------------------------------------------------------
# Music


def test_a_pickle_becomes_piano_rolls(tmp_path):
    path = write_music_pickle(tmp_path / "set.pickle")
    rolls, identity = load_rolls(path)
    with open(path, "rb") as f:
        raw = pickle.load(f)
    first = rolls["train"][0]
    assert first.shape == (len(raw["train"][0]), KEYS) and first.dtype == np.float32
    for t, notes in enumerate(raw["train"][0]):
        assert sorted(np.flatnonzero(first[t]) + LOWEST_NOTE) == sorted(notes)
    assert len(identity["sha256"]) == 64 and identity["path"] == os.path.abspath(path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pickle"
    with open(path, "wb") as f:
        pickle.dump({"train": [os.getcwd], "valid": [], "test": []}, f)  # a reference to a function
    with pytest.raises(UsageError, match="not a piano-roll pickle"):
        load_rolls(str(path))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_music_gradients_match_finite_differences(cell, tmp_path):
    task = music_task(write_music_pickle(tmp_path / "set.pickle"), cell=cell, dtype="float64", hidden=6)
    pieces = task.rolls["train"][:3]
    _, frames, grads = task._loss(pieces, training=True)

    def loss():
        total, count, _ = task._loss(pieces, training=False)
        return total / count

    finite_difference_check(task, loss, grads, ["output_weight", "output_bias", "rnn.weight_ih_l0",
                                                "rnn.weight_hh_l0", "rnn.bias_hh_l0"],
                            np.random.default_rng(1))


def test_padding_changes_nothing(tmp_path):
    """A batch of pieces of different lengths gives the summed NLL of each piece alone."""
    task = music_task(write_music_pickle(tmp_path / "set.pickle"), dtype="float64")
    pieces = sorted(task.rolls["train"][:4], key=len)
    assert len(pieces[0]) != len(pieces[-1])
    together, frames, _ = task._loss(pieces, training=False)
    alone = [task._loss([p], training=False) for p in pieces]
    assert frames == sum(len(p) - 1 for p in pieces) == sum(f for _, f, _ in alone)
    assert together == pytest.approx(sum(t for t, _, _ in alone), rel=1e-12)


def test_music_batches_run_each_piece_on_its_own_frames(tmp_path, monkeypatch):
    """The layer gets each piece's predicting frames as its lengths, so the padding costs no arithmetic; the
    gradients stay those of the summed pieces (the padding carries no loss)."""
    task = music_task(write_music_pickle(tmp_path / "set.pickle"), dtype="float64")
    pieces = task.rolls["train"][:4]
    seen = []
    forward = task.rnn.forward
    monkeypatch.setattr(task.rnn, "forward", lambda x, *a, lengths=None: seen.append(lengths) or forward(
        x, *a, lengths=lengths))
    _, _, grads = task._loss(pieces, training=True)
    np.testing.assert_array_equal(seen[0], [len(p) - 1 for p in pieces])
    alone = [task._loss([p], training=True)[2] for p in pieces]
    frames = [len(p) - 1 for p in pieces]
    for name, value in grads.items():  # gradients of the mean over all frames: the frame-weighted mean
        expected = sum(g[name] * f for g, f in zip(alone, frames)) / sum(frames)
        np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-12, err_msg=name)


def test_music_learns_the_pattern(tmp_path, capsys):
    task = music_task(write_music_pickle(tmp_path / "set.pickle"), epochs=60, lr=3e-2)
    results = run(task)
    assert results["trainer"].history[0][1] > 50  # 88 keys near p = 0.5 cost about 61 nats
    assert results["valid_loss"] < 8 and results["test_loss"] < 8
    assert "nats/frame" in capsys.readouterr().out


@pytest.mark.skipif(not (MUSIC / "JSB_Chorales.mat").exists(),
                    reason="the polyphonic music sets are not beside the repository")
def test_jsb_chorales_from_the_mat_file():
    pytest.importorskip("scipy", reason="reading .mat files needs SciPy")
    task = music_task(str(MUSIC / "JSB_Chorales.mat"), epochs=3, hidden=None, batch=None, lr=None)
    assert [len(task.rolls[s]) for s in ("train", "valid", "test")] == [229, 76, 77]
    assert sum(len(p) for p in task.rolls["test"]) == 4725
    assert task.cfg.hidden == 36 and sum(p.size for p in task.params().values()) == 21400
    results = run(task)
    assert results["test_loss"] < 12.5  # from about 61 nats per frame untrained


# ---------------------------------------------------------------------------------------------------------
# Classification


def write_tsv(path, examples):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in examples))
    return str(path)


def classify_task(path, **overrides):
    options = dict(task="classify", data=path, embedding=8, hidden=12, batch=16, lr=1e-2, epochs=1,
                   eval_every=0, seed=1)
    options.update(overrides)
    return ClassifyTask(ClassifyTask.defaults(Config(**options)))


def test_the_order_set_defeats_a_bag_of_words():
    examples = order_dataset(400, seed=3)
    labels = {label for label, _ in examples}
    assert labels == {"alpha-first", "omega-first"}
    for label, text in examples:
        words = words_of(text)
        assert words.count("alpha") == words.count("omega") == 1
        assert (words.index("alpha") < words.index("omega")) == (label == "alpha-first")
    counts = {label: sum(1 for lab, _ in examples if lab == label) for label in labels}
    assert min(counts.values()) > 150  # balanced: a constant guess is near 50%


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_classify_gradients_match_finite_differences(cell, tmp_path):
    task = classify_task(write_tsv(tmp_path / "set.tsv", order_dataset(200)), cell=cell, dtype="float64",
                         dropout=0.0, layers=2)
    length = max(task._buckets, key=lambda n: len(task._buckets[n]))
    tokens, labels = task._stack("train", task._buckets[length][:5])
    _, _, grads = task._loss(tokens, labels, training=True)

    def loss():
        return task._loss(tokens, labels, training=False)[0] / len(labels)

    finite_difference_check(task, loss, grads, ["embedding", "output_weight", "output_bias",
                                                "rnn.weight_ih_l1_reverse", "rnn.weight_hh_l0",
                                                "rnn.bias_ih_l0_reverse"], np.random.default_rng(2))


def test_classify_learns_word_order(tmp_path, capsys):
    task = classify_task(write_tsv(tmp_path / "set.tsv", order_dataset(2000, seed=5)), epochs=4,
                         dropout=0.2)
    results = run(task)
    assert results["accuracy"] > 0.9
    out = capsys.readouterr().out
    assert "held-out accuracy (test, 200 texts)" in out


def test_a_folder_of_splits_and_unknown_words(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("pos", "good good film"), ("neg", "bad film"), ("pos", "fine")])
    write_tsv(tmp_path / "valid.tsv", [("neg", "awful film")])
    task = classify_task(str(tmp_path), vocabulary=3)
    assert task.vocab == ["<unk>", "film", "good"]
    assert task.labels == ["neg", "pos"]
    texts, labels = task.splits["valid"]
    assert list(texts[0]) == [0, 1] and list(labels) == [0]
    write_tsv(tmp_path / "valid.tsv", [("neutral", "film")])
    with pytest.raises(UsageError, match=r"labels \['neutral'\] of the valid split"):
        classify_task(str(tmp_path))
    (tmp_path / "train.tsv").write_text("no tab here\n")
    with pytest.raises(UsageError, match="line 1: expected label<TAB>text"):
        classify_task(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Both, through the command


def conveyor(*argv):
    out = subprocess.run([sys.executable, "-m", "conveyor", *argv], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("task", ["music", "classify"])
def test_resume_is_exact_for_every_task(task, tmp_path):
    if task == "music":
        data = write_music_pickle(tmp_path / "set.pickle", pieces=(20, 4, 4))
        flags = ["--task", "music", "--data", data, "--hidden", "8", "--batch", "3", "--epochs", "3"]
    else:
        data = write_tsv(tmp_path / "set.tsv", order_dataset(300))
        flags = ["--task", "classify", "--data", data, "--hidden", "8", "--embedding", "6",
                 "--dropout", "0.3", "--epochs", "3"]
    straight, broken = str(tmp_path / "straight.npz"), str(tmp_path / "broken.npz")
    conveyor("train", *flags, "--checkpoint", straight)
    conveyor("train", *flags, "--max-steps", "10", "--checkpoint", broken)
    assert "had reached its end" in conveyor("train", "--resume", broken).stdout
    conveyor("train", "--resume", broken, "--full")
    (meta_a, arrays_a), (meta_b, arrays_b) = checkpoint.load(straight), checkpoint.load(broken)
    assert meta_a["trainer"]["step"] == meta_b["trainer"]["step"] > 10
    assert meta_a["trainer"]["history"] == meta_b["trainer"]["history"]
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(arrays_b[name], value, err_msg=name)
    evaluated = conveyor("eval", broken).stdout
    assert "test split" in evaluated and ("nats/frame" if task == "music" else "accuracy") in evaluated


def test_sample_refuses_a_model_that_does_not_write_text(tmp_path):
    path = str(tmp_path / "music.npz")
    data = write_music_pickle(tmp_path / "set.pickle")
    conveyor("train", "--task", "music", "--data", data, "--hidden", "4", "--epochs", "1",
             "--checkpoint", path)
    out = subprocess.run([sys.executable, "-m", "conveyor", "sample", path], capture_output=True, text=True)
    assert out.returncode == 2 and "is a music model" in out.stderr and "Traceback" not in out.stderr
