"""The ``conveyor`` command.

``conveyor train`` trains a recurrent model (a language model by default; ``--task music`` or ``classify``)
and ``--resume``\\ s it from a checkpoint that knows its model and data; ``conveyor sample`` generates text
from a checkpoint; ``conveyor eval`` scores one on a split; ``conveyor demo`` trains a small network on a toy
memory task; ``conveyor info`` says what this installation has. An error a user can cause prints one line
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

from . import GRU, LSTM, RNN, __version__, _conveyor

_LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


# ---------------------------------------------------------------------------------------------------------
# Argument types: each names what it expected and what came (argparse adds the flag's name)


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _token(text: str) -> str:
    """A token given on the command line: \\n, \\t and \\\\ read as a newline, a tab and a backslash."""
    return re.sub(r"\\[nt\\]", lambda match: _ESCAPES[match.group()], text)


def _number(kind, what, test):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value) or (kind is float and not np.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
count = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0)
non_negative_float = _number(float, "a number >= 0", lambda v: v >= 0)
probability = _number(float, "a probability in [0, 1)", lambda v: 0 <= v < 1)
decay = _number(float, "a factor in (0, 1]", lambda v: 0 < v <= 1)


# ---------------------------------------------------------------------------------------------------------
# demo and info


def _delayed_bits(rng, steps: int, batch: int, delay: int):
    """Random bits in, the bit from `delay` steps earlier out (0 before the sequence has one)."""
    bits = rng.integers(0, 2, size=(steps, batch, 1)).astype(np.float32)
    target = np.zeros_like(bits)
    target[delay:] = bits[:-delay]
    return bits, target


def demo(args) -> int:
    from .train.optim import Adam

    rng = np.random.default_rng(args.seed)
    layer = _LAYERS[args.cell](1, args.hidden, seed=args.seed)
    readout = {"weight": rng.uniform(-0.1, 0.1, (1, args.hidden)).astype(np.float32),
               "bias": np.zeros(1, np.float32)}
    adam_layer, adam_readout = Adam(args.lr), Adam(args.lr)
    print(f"conveyor {__version__}: training a {args.hidden}-unit {args.cell.upper()} to echo the bit it "
          f"saw {args.delay} steps ago (windows of {args.window} steps, batch {args.batch}, "
          f"Adam lr {args.lr})")
    start, first_loss, loss = time.perf_counter(), None, float("nan")
    for step in range(1, args.steps + 1):
        x, target = _delayed_bits(rng, args.window, args.batch, args.delay)
        y = layer(x)[0]
        logits = y @ readout["weight"].T + readout["bias"]
        p = 1.0 / (1.0 + np.exp(-logits))
        # Binary cross-entropy averaged over every (step, row); the first `delay` steps recall nothing.
        scored = slice(args.delay, None)
        n = p[scored].size
        loss = float(-np.mean(target[scored] * np.log(p[scored] + 1e-7)
                              + (1 - target[scored]) * np.log(1 - p[scored] + 1e-7)))
        accuracy = float(np.mean((p[scored] > 0.5) == (target[scored] > 0.5)))
        first_loss = loss if first_loss is None else first_loss
        dlogits = np.zeros_like(p)
        dlogits[scored] = (p[scored] - target[scored]) / n
        readout_grads = {"weight": np.einsum("tbo,tbh->oh", dlogits, y),
                         "bias": dlogits.sum(axis=(0, 1))}
        layer.backward(np.ascontiguousarray(dlogits @ readout["weight"]))
        adam_layer.step(layer.params, layer.grads)
        adam_readout.step(readout, readout_grads)
        if step == 1 or step % args.print_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss:.4f}  accuracy {accuracy:6.1%}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"loss {first_loss:.4f} -> {loss:.4f}")
    return 0


def info(_args) -> int:
    print(f"conveyor {__version__}")
    emulated = " (emulated on the CPU: a test build)" if _conveyor.cuda_emulated() else ""
    print(f"CUDA backend built: {_conveyor.cuda_built()}{emulated}")
    print(f"CUDA available:     {_conveyor.cuda_available()} ({_conveyor.cuda_device_count()} device(s))")
    if _conveyor.cuda_built():
        print("CUDA recurrence:    algorithm='auto' runs the persistent kernels where they fit on the "
              "device and B <= 32, else one launch per step (CONVEYOR_LOG_ALGORITHM=1 prints each choice)")
    runtime = "the process's OpenMP runtime" if _conveyor.sharing_openmp_threads() else "Conveyor's own pool"
    print(f"CPU threads:        {_conveyor.num_threads()} ({runtime})")
    products = "AMX tiles (each float in three bfloat16 parts)" if _conveyor.using_amx() else "AVX/FMA units"
    print(f"CPU products:       float32 on {products}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# train, sample, eval

# flag -> Config field, for the options that go into the configuration
_FIELDS = {"task": "task", "data": "data", "cell": "cell", "layers": "layers", "hidden": "hidden",
           "embedding": "embedding", "level": "level", "tie": "tie", "dropout": "dropout",
           "variational": "variational", "layer_norm": "layer_norm", "weight_dropout": "weight_dropout",
           "zoneout": "zoneout", "zoneout_cell": "zoneout_cell", "batch": "batch", "bptt": "k1",
           "bptt2": "k2",
           "reset_at": "reset_at",
           "max_length": "max_length", "vocabulary": "vocabulary", "optimizer": "optimizer", "lr": "lr",
           "lr_decay": "lr_decay", "decay_after": "decay_after", "clip": "clip", "epochs": "epochs",
           "max_steps": "max_steps", "minutes": "minutes", "eval_every": "eval_every",
           "eval_batch": "eval_batch", "keep_best": "keep_best", "seed": "seed", "device": "device"}
# The options of one task only; every other option serves all three.
_ONLY = {"level": ("lm",), "tie": ("lm",), "bptt": ("lm",), "bptt2": ("lm",), "reset_at": ("lm",),
         "sample": ("lm",),
         "embedding": ("lm", "classify"), "max_length": ("classify",), "vocabulary": ("classify",)}
_LM_MAX_STEPS = 300  # the README's main job: a couple of minutes on a 2-core CPU


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (the usage is a --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given_config(args) -> dict:
    return {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}


def _resumed_config(args, given: dict):
    """The checkpoint's configuration, with the changes a resumed run may make; a flag that contradicts it
    is refused by name."""
    from .train import Config, checkpoint
    from .train.config import RESUMABLE_CHANGES
    from .train.errors import UsageError

    meta, arrays = checkpoint.load(args.resume, "--resume")
    cfg = Config.from_dict(meta["config"])
    changes = {}
    for name, value in given.items():
        field = _FIELDS[name]
        if field in RESUMABLE_CHANGES or field == "data":
            changes[field] = value
        elif getattr(cfg, field) != value:
            raise UsageError(f"{_flag(name)}: {args.resume} was trained with {getattr(cfg, field)!r}, not "
                             f"{value!r} (leave the flag out to resume it as it was)")
    if "data" in changes:
        data = os.path.abspath(changes["data"])
        if not os.path.exists(data):
            raise UsageError(f"--data: no such file or directory: {changes['data']}")
        changes["data"] = data
    elif cfg.data is not None and not os.path.exists(cfg.data):
        raise UsageError(f"--resume: {args.resume} was trained on {cfg.data}, which is not there any more; "
                         "give its new place with --data")
    return cfg.replace(**changes), meta, arrays


def train(args) -> int:
    from .train import TASKS, Config, build, run
    from .train.errors import UsageError

    given = _given_config(args)
    task = given.get("task", "lm")
    for name in list(given) + (["sample"] if hasattr(args, "sample") else []):
        if name in _ONLY and task not in _ONLY[name]:
            raise UsageError(f"{_flag(name)}: not an option of --task {task}")
    if "bptt2" in given and given["bptt2"] < given.get("bptt", 64):
        raise UsageError(f"--bptt2: expected at least --bptt ({given.get('bptt', 64)}), got {given['bptt2']}")
    if args.resume is not None:
        cfg, meta, arrays = _resumed_config(args, given)
        if TASKS[cfg.task].data_identity(cfg)["sha256"] != meta["data"]["sha256"]:
            raise UsageError(f"--data: {cfg.data} is not the data {args.resume} was trained on (its sha256 "
                             "differs: another file, or the file has changed)")
        task = build(cfg, meta["task_state"])
        resume = (args.resume, meta, arrays)
        checkpoint = args.checkpoint or args.resume
    else:
        if "data" in given:
            given["data"] = os.path.abspath(given["data"]) if os.path.exists(given["data"]) else given["data"]
        if task == "lm" and "max_steps" not in given:
            given["max_steps"] = _LM_MAX_STEPS
        cfg = Config(**{_FIELDS[name]: value for name, value in given.items()})
        task = build(cfg)
        resume, checkpoint = None, args.checkpoint
    if checkpoint and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
        raise UsageError(f"--checkpoint: no such folder: {os.path.dirname(checkpoint)}")
    run(task, checkpoint=checkpoint, resume=resume, sample_length=getattr(args, "sample", 300),
        plot=args.plot, print_every=args.print_every)
    return 0


def _load_for_use(path: str, with_data: bool, data: str | None = None):
    """(task, meta) of a checkpoint, its parameters loaded, for sample (``with_data`` False: the model
    alone, language models only) and eval."""
    from .train import TASKS, Config, checkpoint
    from .train.errors import UsageError

    meta, arrays = checkpoint.load(path, "checkpoint")
    if not with_data and meta["task"] != "lm":
        raise UsageError(f"checkpoint: {path} is a {meta['task']} model; sample generates text from "
                         "language models (--task lm)")
    cfg = Config.from_dict(meta["config"])
    if data is not None:
        if not os.path.exists(data):
            raise UsageError(f"--data: no such file or directory: {data}")
        cfg = cfg.replace(data=os.path.abspath(data))
    elif with_data and cfg.data is not None and not os.path.exists(cfg.data):
        raise UsageError(f"--data: {path} was trained on {cfg.data}, which is not there any more; give "
                         "its new place with --data")
    cls = TASKS[meta["task"]]
    task = (cls.from_checkpoint(cfg, meta["task_state"], with_data=False) if not with_data
            else cls.from_checkpoint(cfg, meta["task_state"]))
    xp = task.xp
    task.set_params({k[len("param."):]: xp.asarray(v) for k, v in arrays.items() if k.startswith("param.")})
    return task, meta


def sample(args) -> int:
    task, _ = _load_for_use(args.checkpoint, with_data=False)
    text = task.sample(args.length, temperature=args.temperature, prime=args.prime, seed=args.seed)
    print((args.prime or "") + ("" if task.cfg.level == "char" or not args.prime else " ") + text)
    return 0


def evaluate(args) -> int:
    from .train.errors import UsageError

    task, meta = _load_for_use(args.checkpoint, with_data=True, data=args.data)
    split = args.split or ("test" if task.has_split("test") else "valid")
    if not task.has_split(split):
        raise UsageError(f"--split: {task.cfg.data or 'the data'} has no {split} split")
    loss = task.evaluate(split)
    print(f"{args.checkpoint} (step {meta['trainer']['step']}) on the {split} split of "
          f"{task.cfg.data or 'the bundled corpus'}: {task.describe_split(split, loss)}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The parser


def _train_parser(commands, common):
    S = argparse.SUPPRESS  # a flag not given stays absent: defaults come from the task or the checkpoint
    t = commands.add_parser(
        "train", parents=[common], argument_default=S,
        help="train a language model (default: Tiny Shakespeare, bundled), a music model or a classifier",
        description="Trains a recurrent model with Conveyor's layers. --task lm (default): embedding -> "
                    "LSTM/GRU stack -> softmax on text with truncated BPTT (default: a 2-layer LSTM of 256 "
                    "units, 300 Adam steps on the bundled Tiny Shakespeare). --task music: next-frame "
                    "prediction of 88-key piano rolls (.mat or .pickle). --task classify: a bidirectional "
                    "LSTM over label<TAB>text lines. --resume CHECKPOINT needs no other flag.")
    t.add_argument("--task", choices=("lm", "music", "classify"), help="what to train (default lm)")
    t.add_argument("--data", help="lm: a text file (split 90/5/5) or a folder with "
                                  "ptb.{train,valid,test}.txt (default: the bundled Tiny Shakespeare); "
                                  "music: a .mat or .pickle piano-roll set; classify: a label<TAB>text file "
                                  "or a folder with train/valid/test.tsv")
    t.add_argument("--level", choices=("char", "word"), help="lm: characters or words (default char)")
    t.add_argument("--cell", choices=sorted(_LAYERS), help="default lstm")
    t.add_argument("--layers", type=positive_int, help="default 2 (lm), 1 (music, classify)")
    t.add_argument("--hidden", type=positive_int,
                   help="units per layer (default 256 (lm); music: 100 rnn, 46 gru, 36 lstm; classify 64)")
    t.add_argument("--embedding", type=positive_int, help="embedding size (default 64 (lm), 128 (classify))")
    t.add_argument("--tie", action="store_true", help="lm: tie the embedding and output weights (Press & "
                                                      "Wolf 2017; needs --embedding = --hidden)")
    t.add_argument("--dropout", type=probability, help="lm: on embeddings, between layers and before the "
                                                       "output (Zaremba et al. 2014); default 0")
    t.add_argument("--variational", action="store_true",
                   help="one dropout mask per window (Gal & Ghahramani 2016)")
    t.add_argument("--layer-norm", action="store_true",
                   help="layer-normalised LSTM/GRU (Ba et al. 2016): LN of W x, R h and (LSTM) the cell")
    t.add_argument("--weight-dropout", type=probability,
                   help="DropConnect on the recurrent weights, one mask per window (AWD-LSTM's weight drop, "
                        "Merity et al. 2017); default 0")
    t.add_argument("--zoneout", type=probability,
                   help="zoneout of h (Krueger et al. 2017), lstm and gru; default 0")
    t.add_argument("--zoneout-cell", type=probability, help="zoneout of the LSTM's c; default 0")
    t.add_argument("--batch", type=positive_int, help="lm: parallel streams (default 32); music: pieces "
                                                      "(default 8); classify: texts (default 32)")
    t.add_argument("--bptt", type=positive_int, help="lm: TBPTT k1, steps per window (default 64)")
    t.add_argument("--bptt2", type=positive_int, help="lm: TBPTT k2 >= k1, steps to backpropagate through "
                                                      "(default: k1)")
    t.add_argument("--reset-at", metavar="TOKEN", type=_token,
                   help="lm: a token that ends a document (e.g. '<eos>', or '\\n' for a newline): each "
                        "stream's state restarts from zeros after it, and no gradient crosses it")
    t.add_argument("--max-length", type=positive_int, help="classify: words kept of a text (default 100)")
    t.add_argument("--vocabulary", type=_number(int, "an integer >= 2", lambda v: v >= 2),
                   help="classify: most frequent words kept (default 20000)")
    t.add_argument("--optimizer", choices=("adam", "sgd"), help="default adam")
    t.add_argument("--lr", type=positive_float, help="default 2e-3 (lm, Adam), 1.0 (lm, SGD), 3e-3 (music), "
                                                     "1e-3 (classify)")
    t.add_argument("--lr-decay", type=decay, help="SGD: multiply lr by this (default 1) ...")
    t.add_argument("--decay-after", type=count, help="... at the end of every epoch from this one on "
                                                     "(default 0: never)")
    t.add_argument("--clip", type=non_negative_float, help="gradient-norm clipping (0: none; default 5, "
                                                           "music 1)")
    t.add_argument("--epochs", type=positive_int, help="default 1 (lm), 100 (music), 2 (classify)")
    t.add_argument("--max-steps", type=positive_int, help="stop after this many steps (lm default 300)")
    t.add_argument("--full", dest="max_steps", action="store_const", const=None,
                   help="no step limit: run every epoch")
    t.add_argument("--minutes", type=positive_float, help="stop after this much time")
    t.add_argument("--eval-every", type=count, help="validate every N steps (0: only at the end; default "
                                                    "100 (lm), once an epoch (music), 0 (classify))")
    t.add_argument("--eval-batch", type=positive_int, help="default 16")
    t.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                   help="early stopping: also report the test figure of the parameters with the best "
                        "validation (default: on for music)")
    t.add_argument("--sample", type=count, help="lm: tokens to generate at the end (default "
                                                             "300; 0: none)")
    t.add_argument("--checkpoint", default=None, help="save the run here (.npz) at every validation and at "
                                                      "the end (atomically)")
    t.add_argument("--resume", default=None, help="resume exactly from a checkpoint; it knows its model and "
                                                  "data, and keeps saving there unless --checkpoint says "
                                                  "otherwise")
    t.add_argument("--plot", default=None, help="draw the training and validation curves to this PNG "
                                                "(needs matplotlib)")
    t.add_argument("--seed", type=count, help="default 0")
    t.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    t.add_argument("--print-every", type=positive_int, default=20,
                   help="a progress line every N steps when not on a terminal (default 20)")
    t.set_defaults(run=train)


def main(argv=None) -> int:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser = _Parser(prog="conveyor", parents=[common],
                                     description="Fast LSTM, GRU and RNN layers.")
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = commands.add_parser("demo", parents=[common],
                            help="train a small recurrent network on a toy memory task")
    d.add_argument("--cell", choices=sorted(_LAYERS), default="lstm")
    d.add_argument("--hidden", type=positive_int, default=32, help="hidden units (default 32)")
    d.add_argument("--delay", type=positive_int, default=4, help="how many steps back to recall (default 4)")
    d.add_argument("--window", type=positive_int, default=32, help="steps per window (default 32)")
    d.add_argument("--batch", type=positive_int, default=32)
    d.add_argument("--steps", type=positive_int, default=300, help="training steps (default 300)")
    d.add_argument("--lr", type=positive_float, default=0.01)
    d.add_argument("--seed", type=count, default=0)
    d.add_argument("--print-every", type=positive_int, default=25)
    d.set_defaults(run=demo)
    _train_parser(commands, common)
    s = commands.add_parser("sample", parents=[common], help="generate text from a language-model checkpoint")
    s.add_argument("checkpoint", help="a checkpoint written by conveyor train --checkpoint")
    s.add_argument("--length", type=positive_int, default=500, help="tokens to generate (default 500)")
    s.add_argument("--temperature", type=positive_float, default=0.8, help="default 0.8")
    s.add_argument("--prime", default=None, help="text to start from (default: a new line)")
    s.add_argument("--seed", type=count, default=0)
    s.set_defaults(run=sample)
    e = commands.add_parser("eval", parents=[common], help="a checkpoint's loss on a split of its data")
    e.add_argument("checkpoint", help="a checkpoint written by conveyor train --checkpoint")
    e.add_argument("--data", default=None, help="data read as in training (default: the checkpoint's)")
    e.add_argument("--split", choices=("train", "valid", "test"), default=None,
                   help="default test (valid where there is none)")
    e.set_defaults(run=evaluate)
    commands.add_parser("info", parents=[common],
                        help="what this installation was built with").set_defaults(run=info)
    args = parser.parse_args(argv)
    if args.command == "demo" and not args.delay < args.window:
        parser.error(f"--delay: expected 0 < delay < window ({args.window}), got {args.delay}")
    from .train.errors import UsageError

    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130
    except (UsageError, OSError, ValueError, TypeError, MemoryError) as error:
        if getattr(args, "debug", False):
            raise
        message = (str(error) or type(error).__name__).splitlines()[0]
        hint = "" if isinstance(error, UsageError) else " (--debug for the traceback)"
        print(f"conveyor {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
