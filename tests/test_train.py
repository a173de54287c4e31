"""``conveyor train`` and its parts: corpora, streams, the language model's gradients by finite
differences, a short run whose loss falls, determinism, exact resumption from a checkpoint, word level, the
command line."""

import subprocess
import sys

import numpy as np
import pytest

from conveyor import lm

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
        "All:\nResolved. resolved.\n\n") * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def small_config(**overrides):
    options = dict(cell="lstm", embedding=12, hidden=16, layers=2, batch=4, k1=8, epochs=1, max_steps=None,
                   eval_every=0, eval_batch=2, lr=1e-2, clip=5.0, seed=3)
    options.update(overrides)
    return lm.Config(**options)


def test_char_corpus_splits_in_order(text_file):
    corpus = lm.load_corpus(text_file, "char")
    assert corpus.vocab == sorted(set(TEXT))
    n = len(TEXT)
    sizes = (len(corpus.train), len(corpus.valid), len(corpus.test))
    assert sizes == (int(0.9 * n), int(0.95 * n) - int(0.9 * n), n - int(0.95 * n))
    assert "".join(corpus.vocab[i] for i in corpus.train[:14]) == TEXT[:14]


def test_word_level_reads_a_ptb_style_directory(tmp_path):
    for split, words in (("train", "the cat sat\non the mat\n" * 30), ("valid", "the cat\n" * 10),
                         ("test", "on the mat\n" * 10)):
        (tmp_path / f"ptb.{split}.txt").write_text(words)
    corpus = lm.load_corpus(str(tmp_path), "word")
    assert "<eos>" in corpus.vocab and "cat" in corpus.vocab
    assert [corpus.vocab[i] for i in corpus.train[:4]] == ["the", "cat", "sat", "<eos>"]
    assert len(corpus.test) == 40


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: no such file or directory"):
        lm.load_corpus(str(tmp_path / "nothing.txt"), "char")
    with pytest.raises(FileNotFoundError, match="has no ptb.train.txt"):
        lm.load_corpus(str(tmp_path), "word")


def test_bundled_corpus_is_tiny_shakespeare():
    corpus = lm.load_corpus(None, "char")
    assert len(corpus.vocab) == 65
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 1_115_394


def test_streams_read_the_corpus_in_parallel_rows():
    s = lm.streams(np.arange(23), 4)
    assert s.shape == (5, 4)
    np.testing.assert_array_equal(s[:, 1], [5, 6, 7, 8, 9])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_window_gradients_match_finite_differences(cell, tie, text_file):
    corpus = lm.load_corpus(text_file, "char")
    cfg = small_config(cell=cell, tie=tie, embedding=16 if tie else 12, dtype="float64", clip=0.0)
    trainer = lm.Trainer(corpus, cfg)
    tokens, targets = trainer.train_streams[:8], trainer.train_streams[1:9]
    _, grads = trainer.window_gradients(tokens, targets)
    params = trainer.model.all_params()
    assert set(grads) == set(params)
    rng = np.random.default_rng(0)

    def loss():
        trainer.tbptt.reset()
        trainer.model.rnn.eval()
        emb, _ = trainer.model.embed(tokens, 0)
        value, _, _ = trainer.model.loss_and_output_grads(trainer.tbptt.forward(emb), targets, 0)
        return value

    names = ("embedding", "output_bias", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.bias_ih_l1")
    for name in names + (() if tie else ("output_weight",)):
        p = params[name]
        for _ in range(3):
            index = tuple(int(rng.integers(n)) for n in p.shape)
            if name == "embedding":
                index = (int(tokens[int(rng.integers(8)), int(rng.integers(4))]),) + index[1:]
            old = p[index]
            p[index] = old + 1e-6
            up = loss()
            p[index] = old - 1e-6
            down = loss()
            p[index] = old
            fd = (up - down) / 2e-6
            assert abs(grads[name][index] - fd) <= 1e-7 + 1e-5 * abs(fd), (name, index, fd)


def test_a_short_run_learns_and_ends_with_a_sample(text_file, capsys):
    corpus = lm.load_corpus(text_file, "char")
    results = lm.run(small_config(max_steps=80, lr=2e-2, layers=1, hidden=32), corpus, sample_length=40,
                     print_every=40)
    first = results["trainer"].history[0][1]
    assert first > np.log(len(corpus.vocab)) - 0.5  # an untrained model is near uniform
    assert results["valid_loss"] < first - 1.0
    assert len(results["sample"]) == 40 and set(results["sample"]) <= set(corpus.vocab)
    out = capsys.readouterr().out
    assert "nats/char" in out and "bits/char" in out and "tokens/s" in out and "--- sample" in out


def test_same_seed_same_run_and_another_seed_another(text_file):
    corpus = lm.load_corpus(text_file, "char")
    runs = [lm.run(small_config(max_steps=12, dropout=0.3, seed=seed), corpus, sample_length=0)["trainer"]
            for seed in (5, 5, 6)]
    a, b, c = (r.model.all_params() for r in runs)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[name], c[name]) for name in a)


@pytest.mark.parametrize(("optimizer", "k2"), [("adam", None), ("sgd", None), ("adam", 20)],
                         ids=["adam", "sgd", "adam-k2=20"])
def test_checkpoint_resumes_exactly(optimizer, k2, text_file, tmp_path):
    """Stopped and resumed, a run gives the same numbers as an unbroken one, also when TBPTT reaches back
    over earlier windows (k2 > k1) and with dropout."""
    corpus = lm.load_corpus(text_file, "char")
    cfg = small_config(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2, dropout=0.2,
                       lr_decay=0.5, decay_after=1, epochs=2, k2=k2)
    steps = lm.Trainer(corpus, cfg).windows_per_epoch + 7  # across an epoch boundary
    straight = lm.run(lm.Config(**{**cfg.__dict__, "max_steps": steps}), corpus, sample_length=0)["trainer"]
    path = str(tmp_path / "run.npz")
    lm.run(lm.Config(**{**cfg.__dict__, "max_steps": steps - 9}), corpus, checkpoint=path, sample_length=0)
    resumed = lm.run(lm.Config(**{**cfg.__dict__, "max_steps": steps}), corpus, resume=path,
                     sample_length=0)["trainer"]
    assert resumed.step == straight.step == steps
    for name, value in straight.model.all_params().items():
        np.testing.assert_array_equal(resumed.model.all_params()[name], value, err_msg=name)
    assert resumed.history == straight.history


def test_word_level_run_reports_perplexity(tmp_path, capsys):
    loop = "the cat sat on the mat\n"
    for split, words in (("train", loop * 200), ("valid", loop * 20), ("test", loop * 20)):
        (tmp_path / f"ptb.{split}.txt").write_text(words)
    corpus = lm.load_corpus(str(tmp_path), "word")
    results = lm.run(small_config(level="word", max_steps=60, lr=3e-2, layers=1), corpus, sample_length=10)
    assert results["valid_loss"] < 1.0  # a six-word loop is easy
    assert "perplexity" in capsys.readouterr().out
    assert "test_loss" in results


def test_tie_needs_equal_sizes(text_file):
    corpus = lm.load_corpus(text_file, "char")
    with pytest.raises(SystemExit, match="--tie needs --embedding = --hidden"):
        lm.Trainer(corpus, small_config(tie=True, embedding=8, hidden=16))


def test_command_line(text_file, tmp_path):
    plot = tmp_path / "curves.png"
    command = [sys.executable, "-m", "conveyor", "train", "--data", text_file, "--layers", "1",
               "--hidden", "16", "--embedding", "8", "--batch", "4", "--bptt", "8", "--max-steps", "6",
               "--eval-every", "3", "--sample", "20", "--plot", str(plot)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "validation" in out.stdout and "--- sample" in out.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out.stdout
    else:
        assert plot.exists() and plot.stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "conveyor", "train", "--dropout", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--dropout" in bad.stderr
