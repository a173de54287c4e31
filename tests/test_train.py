"""The language-model task of ``conveyor train`` and the loop: corpora, streams, the model's gradients by
finite differences, a short run whose loss falls, determinism, exact resumption from a checkpoint, word
level."""

import numpy as np
import pytest

from conveyor.train import Config, LanguageTask, UsageError, checkpoint, language, run

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
    return Config(**options)


def task_for(corpus, **overrides):
    return LanguageTask(LanguageTask.defaults(small_config(**overrides)), corpus)


def test_char_corpus_splits_in_order(text_file):
    corpus = language.load_corpus(text_file, "char")
    assert corpus.vocab == sorted(set(TEXT))
    n = len(TEXT)
    sizes = (len(corpus.train), len(corpus.valid), len(corpus.test))
    assert sizes == (int(0.9 * n), int(0.95 * n) - int(0.9 * n), n - int(0.95 * n))
    assert "".join(corpus.vocab[i] for i in corpus.train[:14]) == TEXT[:14]


def test_word_level_reads_a_ptb_style_directory(tmp_path):
    for split, words in (("train", "the cat sat\non the mat\n" * 30), ("valid", "the cat\n" * 10),
                         ("test", "on the mat\n" * 10)):
        (tmp_path / f"ptb.{split}.txt").write_text(words)
    corpus = language.load_corpus(str(tmp_path), "word")
    assert "<eos>" in corpus.vocab and "cat" in corpus.vocab
    assert [corpus.vocab[i] for i in corpus.train[:4]] == ["the", "cat", "sat", "<eos>"]
    assert len(corpus.test) == 40


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="--data: no such file or directory"):
        language.load_corpus(str(tmp_path / "nothing.txt"), "char")
    with pytest.raises(UsageError, match="has no ptb.train.txt"):
        language.load_corpus(str(tmp_path), "word")


def test_bundled_corpus_is_tiny_shakespeare():
    corpus = language.load_corpus(None, "char")
    assert len(corpus.vocab) == 65
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 1_115_394


def test_streams_read_the_corpus_in_parallel_rows():
    s = language.streams(np.arange(23), 4)
    assert s.shape == (5, 4)
    np.testing.assert_array_equal(s[:, 1], [5, 6, 7, 8, 9])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_window_gradients_match_finite_differences(cell, tie, text_file):
    corpus = language.load_corpus(text_file, "char")
    task = task_for(corpus, cell=cell, tie=tie, embedding=16 if tie else 12, dtype="float64", clip=0.0,
                    dropout=0.0)
    tokens, targets = task.train_streams[:8], task.train_streams[1:9]
    _, grads = task.window_gradients(tokens, targets, 0)
    params = task.params()
    assert set(grads) == set(params)
    rng = np.random.default_rng(0)

    def loss():
        task.tbptt.reset()
        task.model.rnn.eval()
        emb, _ = task.model.embed(tokens, 0)
        value, _, _ = task.model.loss_and_output_grads(task.tbptt.forward(emb), targets, 0)
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
    corpus = language.load_corpus(text_file, "char")
    results = run(task_for(corpus, max_steps=80, lr=2e-2, layers=1, hidden=32), sample_length=40,
                  print_every=40)
    first = results["trainer"].history[0][1]
    assert first > np.log(len(corpus.vocab)) - 0.5  # an untrained model is near uniform
    assert results["valid_loss"] < first - 1.0
    assert len(results["sample"]) == 40 and set(results["sample"]) <= set(corpus.vocab)
    out = capsys.readouterr().out
    assert "nats/char" in out and "bits/char" in out and "tokens/s" in out and "--- sample" in out
    assert "80 steps (" in out.splitlines()[0]  # the header says where the run stops


def test_same_seed_same_run_and_another_seed_another(text_file):
    corpus = language.load_corpus(text_file, "char")
    runs = [run(task_for(corpus, max_steps=12, dropout=0.3, seed=seed))["trainer"] for seed in (5, 5, 6)]
    a, b, c = (r.task.params() for r in runs)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[name], c[name]) for name in a)


def _resumed(path):
    meta, arrays = checkpoint.load(path)
    return path, meta, arrays


@pytest.mark.parametrize(("optimizer", "k2", "reset_at"),
                         [("adam", None, None), ("sgd", None, None), ("adam", 20, None), ("adam", 20, "\n")],
                         ids=["adam", "sgd", "adam-k2=20", "adam-k2=20-reset"])
def test_checkpoint_resumes_exactly(optimizer, k2, reset_at, text_file, tmp_path):
    """Stopped and resumed, a run gives the same numbers as an unbroken one, also when TBPTT reaches back
    over earlier windows (k2 > k1), with their document boundaries, and with dropout."""
    corpus = language.load_corpus(text_file, "char")
    options = dict(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2, dropout=0.2, lr_decay=0.5,
                   decay_after=1, epochs=2, k2=k2, reset_at=reset_at)
    steps = task_for(corpus, **options).steps_per_epoch + 7  # across an epoch boundary
    straight = run(task_for(corpus, max_steps=steps, **options))["trainer"]
    path = str(tmp_path / "run.npz")
    run(task_for(corpus, max_steps=steps - 9, **options), checkpoint=path)
    resumed = run(task_for(corpus, max_steps=steps, **options), resume=_resumed(path))["trainer"]
    assert resumed.step == straight.step == steps
    for name, value in straight.task.params().items():
        np.testing.assert_array_equal(resumed.task.params()[name], value, err_msg=name)
    assert resumed.history == straight.history
    assert resumed.optimizer.lr == straight.optimizer.lr


def test_checkpoint_records_what_rebuilds_the_run(text_file, tmp_path):
    corpus = language.load_corpus(text_file, "char")
    path = str(tmp_path / "run.npz")
    run(task_for(corpus, max_steps=3, cell="gru", hidden=20), checkpoint=path)
    meta, arrays = checkpoint.load(path)
    assert meta["task"] == "lm" and meta["config"]["cell"] == "gru" and meta["config"]["hidden"] == 20
    assert meta["task_state"]["vocab"] == corpus.vocab
    assert meta["data"] == corpus.identity and len(meta["data"]["sha256"]) == 64
    assert meta["trainer"]["step"] == 3 and meta["trainer"]["optimizer"]["t"] == 3
    assert {f"param.{name}" for name in task_for(corpus, cell="gru", hidden=20).params()} <= set(arrays)


def test_checkpoint_writes_are_atomic(text_file, tmp_path, monkeypatch):
    """A write killed half-way leaves the previous checkpoint whole and no temporary file behind."""
    corpus = language.load_corpus(text_file, "char")
    path = tmp_path / "run.npz"
    run(task_for(corpus, max_steps=2), checkpoint=str(path))
    before = path.read_bytes()
    real_savez = np.savez

    def torn_savez(f, **arrays):
        real_savez(f, **{k: v for k, v in list(arrays.items())[:2]})
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(np, "savez", torn_savez)
    with pytest.raises(KeyboardInterrupt):
        run(task_for(corpus, max_steps=3), checkpoint=str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "run.npz"]


def test_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(UsageError, match="--resume: no such file"):
        checkpoint.load(str(tmp_path / "none.npz"), "--resume")
    (tmp_path / "text.npz").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="is not a Conveyor checkpoint"):
        checkpoint.load(str(tmp_path / "text.npz"), "--resume")
    np.savez(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(UsageError, match="is not a Conveyor checkpoint"):
        checkpoint.load(str(tmp_path / "plain.npz"), "--resume")


def test_word_level_run_reports_perplexity(tmp_path, capsys):
    loop = "the cat sat on the mat\n"
    for split, words in (("train", loop * 200), ("valid", loop * 20), ("test", loop * 20)):
        (tmp_path / f"ptb.{split}.txt").write_text(words)
    corpus = language.load_corpus(str(tmp_path), "word")
    results = run(task_for(corpus, level="word", max_steps=60, lr=3e-2, layers=1), sample_length=10)
    assert results["valid_loss"] < 1.0  # a six-word loop is easy
    assert "perplexity" in capsys.readouterr().out
    assert "test_loss" in results


def test_tie_needs_equal_sizes(text_file):
    corpus = language.load_corpus(text_file, "char")
    with pytest.raises(UsageError, match="--tie: needs --embedding = --hidden"):
        task_for(corpus, tie=True, embedding=8, hidden=16)


def test_too_many_streams_for_the_corpus_is_refused(text_file):
    corpus = language.load_corpus(text_file, "char")
    with pytest.raises(UsageError, match=r"--batch: 1000 streams .* expected at most"):
        task_for(corpus, batch=1000)


def test_unknown_tokens_are_named_or_mapped_to_unk():
    with pytest.raises(UsageError, match=r"--prime: 1 token\(s\) not in the model's vocabulary \('z'\)"):
        language.ids_of(list("abz"), {"a": 0, "b": 1}, "--prime")
    np.testing.assert_array_equal(language.ids_of(["a", "q"], {"<unk>": 0, "a": 1}, "--data"), [1, 0])


def test_reset_at_restarts_each_stream_after_every_separator(text_file, monkeypatch):
    """--reset-at "\\n": TBPTT gets, for every window of training and of evaluation, a mask true exactly
    where the stream's previous token is a newline (computed here from the raw streams)."""
    corpus = language.load_corpus(text_file, "char")
    task = task_for(corpus, reset_at="\n", max_steps=12)
    newline = corpus.index["\n"]
    seen = []
    forward = language.TBPTT.forward

    def recording(self, x, reset=None):
        seen.append(reset)
        return forward(self, x, reset=reset)

    monkeypatch.setattr(language.TBPTT, "forward", recording)
    data = language.streams(corpus.train, 4)
    for position in range(12):
        task.train_batch(0, position, position)
    expected = np.zeros(data.shape, bool)
    expected[1:] = data[:-1] == newline
    got = np.concatenate(seen)
    assert got.dtype == bool and got.any() and not got.all()
    np.testing.assert_array_equal(got, expected[:len(got)])
    seen.clear()
    task.evaluate("valid")
    assert all(mask is not None for mask in seen) and any(mask.any() for mask in seen)


def test_reset_at_makes_each_document_start_afresh(tmp_path):
    """A corpus of one repeated document: with --reset-at, every copy is read from the same zero state, so
    evaluation over two copies scores the second exactly as the first (without it, the carried state
    changes the second's scores)."""
    doc = "the cat sat on the mat\n"
    for split, words in (("train", doc * 50), ("valid", doc * 2), ("test", doc * 2)):
        (tmp_path / f"ptb.{split}.txt").write_text(words)
    corpus = language.load_corpus(str(tmp_path), "word")
    ids = corpus.valid  # two copies of the 7 tokens "the cat sat on the mat <eos>"
    losses = {}
    for reset_at in (None, "<eos>"):
        task = task_for(corpus, level="word", layers=1, eval_batch=1, reset_at=reset_at, k1=5)
        model = task.model
        scores = []
        for end in range(1, len(ids)):  # the loss of each prediction alone: the window up to it
            task.cfg = task.cfg.replace(k1=end)
            scores.append(task.evaluate_ids(ids[:end + 1]) * end - sum(scores))
        losses[reset_at] = np.array(scores)
        assert model is task.model
    first, second = slice(0, 6), slice(7, 13)  # each copy's predictions after its first word
    np.testing.assert_allclose(losses["<eos>"][second], losses["<eos>"][first], rtol=1e-5)
    assert not np.allclose(losses[None][second], losses[None][first], rtol=1e-5)


def test_reset_at_a_token_outside_the_vocabulary_is_refused(text_file):
    corpus = language.load_corpus(text_file, "char")
    with pytest.raises(UsageError, match=r"--reset-at: '<eos>' is not a token of the corpus's vocabulary"):
        task_for(corpus, reset_at="<eos>")
