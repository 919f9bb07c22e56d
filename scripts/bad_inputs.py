#!/usr/bin/env python3
"""Tries retort as a careless user would: every key of a config set to wrong values, garbage
model/data/tokenizer/cache files, odd command lines, resumes of a run with damaged files, bad
values for the flags of eval, generate, cache and selftest. Flags any case that panics, prints a
backtrace, exits with a code other than 0/2 (1 is reported: a runtime fault should be rare
here), refuses without naming anything, or changes a file that was already on disk.

    cargo build && python3 scripts/bad_inputs.py target/debug/retort [CONFIG]

CONFIG defaults to examples/configs/quickstart.toml. Only `retort check` and fast commands
run, so the sweep takes a few minutes. Prints one line per flagged case and a summary; exits 1
if anything was flagged; VERBOSE=1 also lists the accepted cases.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

VALUES = ["", "-1", "0", "1e300", "-1e300", "nan", "inf", "18446744073709551616", "x", "[]",
          "{}", "true", "[1, 2]", "{ kind = \"nope\" }", "1.5", "\"\"", "/nonexistent/x"]
FLAG_VALUES = ["0", "-1", "nan", "inf", "1e30", "x", "", "99999999999999999999", "cuda:7"]
TIMEOUT_S = 120
TINY_RUN = """
[data]
kind = "synthetic"
vocab = 16
train_tokens = 4000
val_tokens = 400
[teacher]
kind = "transformer"
n_layer = 1
n_embd = 16
n_head = 2
context = 8
[teacher.pretrain]
steps = 3
[student]
kind = "transformer"
n_layer = 1
n_embd = 8
n_head = 2
context = 8
[train]
steps = 3
batch_size = 2
seq_len = 8
[eval]
batches = 1
batch_size = 2
"""


def leaves(table, prefix=""):
    """Dotted key paths of every value in a parsed TOML table (list elements as [i])."""
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield path
            yield from leaves(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield path
            for i, v in enumerate(value):
                yield from leaves(v, f"{path}[{i}]")
        else:
            yield path


def snapshot(root):
    """Digest of every file under root, by relative path."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(retort, args, cwd):
    env = dict(os.environ, RUST_BACKTRACE="1")
    try:
        p = subprocess.run([retort, *args], cwd=cwd, env=env, capture_output=True, text=True,
                           errors="replace", timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return p.returncode, p.stderr


def verdict(rc, err):
    """Why a case is flagged, or None."""
    if rc is None:
        return err
    if "panicked" in err or "stack backtrace" in err or "RUST_BACKTRACE" in err:
        return "panic or backtrace"
    if rc not in (0, 1, 2):
        return f"exit code {rc}"
    if rc == 2 and "error" not in err:
        return "exit 2 without an error line"
    return None


class Sweep:
    def __init__(self, retort, config):
        self.retort = os.path.abspath(retort)
        self.config = Path(config).read_text()
        self.cases = 0
        self.flagged = []
        self.runtime = []
        self.accepted = []

    def case(self, name, args, setup=None, may_write=False):
        """Runs retort with args in a fresh directory holding c.toml, a precious file tree
        and whatever setup(dir) writes; checks the verdict and that nothing changed (unless
        the command succeeded and may_write)."""
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.toml").write_text(self.config)
            (Path(d) / "precious").mkdir()
            (Path(d) / "precious" / "notes.txt").write_text("keep me\n")
            if setup:
                setup(Path(d))
            before = snapshot(d)
            rc, err = run(self.retort, args, d)
            after = {k: v for k, v in snapshot(d).items() if k in before}
            self.cases += 1
            why = verdict(rc, err)
            if after != before and not (may_write and rc == 0):
                why = "changed " + ", ".join(k for k in before if before[k] != after.get(k))
            last = err.strip().splitlines()[-1][:160] if err.strip() else ""
            if why:
                self.flagged.append(f"{name}: {why} | {last}")
            elif rc == 0:
                self.accepted.append(name)
            elif rc == 1:
                self.runtime.append(f"{name}: {last}")

    def config_keys(self):
        keys = list(leaves(tomllib.loads(self.config)))
        for key in keys:
            for value in VALUES:
                self.case(f"--set {key}={value}", ["check", "c.toml", "--set", f"{key}={value}"])
            self.case(f"unknown key under {key}", ["check", "c.toml", "--set", f"{key}.zzz=1"])
        for lines in (1, 3, 10):
            broken = "\n".join(self.config.splitlines()[:-lines]) + "\n[[loss]\n"
            self.case(f"truncated config -{lines}", ["check", "broken.toml"],
                      lambda d, b=broken: (d / "broken.toml").write_text(b))

    def files(self):
        garbage = os.urandom(4096)
        writers = {
            "gguf garbage": lambda d: (d / "m.gguf").write_bytes(garbage),
            "gguf header only": lambda d: (d / "m.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 16),
            "safetensors garbage": lambda d: (d / "m.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{\"a\":1}"),
            "hf dir garbage": lambda d: ((d / "hf").mkdir(), (d / "hf/config.json").write_text("{"),
                                         (d / "hf/model.safetensors").write_bytes(garbage)),
            "hf dir empty config": lambda d: ((d / "hf").mkdir(), (d / "hf/config.json").write_text("{}")),
        }
        for name, write in writers.items():
            target = "hf" if name.startswith("hf") else ("m.gguf" if "gguf" in name else "m.safetensors")
            for kind in ("llama", "transformer"):
                self.case(f"teacher {kind} {name}", ["check", "c.toml", "--set", f"teacher.kind={kind}",
                                                     "--set", f"teacher.checkpoint={target}"], write)
            self.case(f"eval {name}", ["eval", "--model", target, "--data", "c.toml"], write)
            self.case(f"generate {name}", ["generate", "--model", target, "--prompt", "hi"], write)
        text = lambda d: (d / "t.txt").write_bytes(garbage)
        odd = lambda d: (d / "t.bin").write_bytes(b"\1\2\3")
        tok = lambda d: (d / "tok.json").write_text("{\"model\": 3}")
        self.case("text data of binary bytes", ["check", "c.toml", "--set", "data.kind=text", "--set",
                                                "data.path=t.txt"], text)
        self.case("odd-length token file", ["check", "c.toml", "--set", "data={kind=\"tokens\", "
                                            "train=\"t.bin\", val=\"t.bin\", vocab=64}"], odd)
        self.case("garbage tokenizer.json", ["check", "c.toml", "--set", "data.kind=text", "--set",
                                             "data.path=c.toml", "--set", "data.tokenizer={kind=\"hf\", "
                                             "path=\"tok.json\"}"], tok)
        jsonl_cases = {
            "not JSON": "{\"text\": \"a\"}\nnot json\n",
            "no text field": "{\"body\": \"a\"}\n",
            "a number for text": "{\"text\": 3}\n",
            "empty": "",
            "binary": garbage,
        }
        for name, body in jsonl_cases.items():
            write = (lambda d, b=body: (d / "d.jsonl").write_bytes(b if isinstance(b, bytes) else b.encode()))
            self.case(f"jsonl data {name}", ["check", "c.toml", "--set", "data={kind=\"jsonl\", path=\"d.jsonl\", "
                                             "tokenizer={kind=\"char\"}}"], write)
        tree = lambda d: ((d / "texts").mkdir(), (d / "texts/a.txt").write_text("to be or not " * 300),
                          (d / "texts/b.bin").write_bytes(garbage))
        self.case("text directory with a binary file", ["check", "c.toml", "--set", "data={kind=\"text\", "
                                                        "path=\"texts\", tokenizer={kind=\"char\"}}"], tree)
        cache = lambda d: ((d / "cache").mkdir(), (d / "cache/header.json").write_text("{\"v\": 1}"))
        self.case("garbage cache", ["check", "c.toml", "--set", "teacher={kind=\"cached\", path=\"cache\"}"], cache)
        self.case("cache inspect garbage", ["cache", "inspect", "cache"], cache)
        self.case("plot a non-run", ["plot", "precious"])
        self.case("resume a non-run", ["run", "--resume", "precious"])
        self.case("run into a foreign dir", ["run", "c.toml", "--out", "precious", "--force"])
        self.case("cache into a file", ["cache", "c.toml", "--out", "precious/notes.txt"])
        for flags in (["--context", "0"], ["--max-tokens", "-1"], ["--temperature", "nan"]):
            self.case(f"generate {flags}", ["generate", "--model", "m.gguf", "--prompt", "x", *flags],
                      writers["gguf garbage"])

    def run_dirs(self):
        """Resumes of a finished run whose files were damaged: each is refused and changes
        nothing (only the undamaged control may succeed and rewrite its report)."""
        with tempfile.TemporaryDirectory() as base:
            base = Path(base)
            (base / "c.toml").write_text(TINY_RUN)
            rc, err = run(self.retort, ["run", "c.toml", "--out", "r", "--quiet"], base)
            if rc != 0:
                self.flagged.append(f"tiny run: exit {rc} | {err.strip()[-160:]}")
                return

            def edit(rel, change):
                def damage(d):
                    shutil.copytree(base / "r", d / "r")
                    if change is not None:
                        change(d / "r" / rel)
                return damage

            def flip_last(p):
                b = bytearray(p.read_bytes())
                b[-1] ^= 1
                p.write_bytes(bytes(b))

            damages = {
                "nothing (control)": (".", None),
                "run.json garbage": ("run.json", lambda p: p.write_text("{")),
                "run.json run id changed": ("run.json", lambda p: p.write_text(
                    p.read_text().replace('"run_id": "', '"run_id": "0'))),
                "config.resolved.toml edited": ("config.resolved.toml", lambda p: p.write_text(
                    p.read_text() + "\n# edited\n")),
                "config.resolved.toml deleted": ("config.resolved.toml", lambda p: p.unlink()),
                "progress.json garbage": ("progress.json", lambda p: p.write_bytes(os.urandom(64))),
                "progress.json step changed": ("progress.json", lambda p: p.write_text(
                    p.read_text().replace('"steps": ', '"steps": 1'))),
                "student weights flipped": ("student/model.safetensors", flip_last),
                "teacher removed": ("teacher", shutil.rmtree),
                # Cut inside the first phase (a cut tail after the last phase is rewritten).
                "metrics.jsonl cut": ("metrics.jsonl", lambda p: p.write_bytes(p.read_bytes()[:20])),
                ".lock a directory": (".lock", lambda p: (p.unlink(), p.mkdir())),
            }
            for name, (rel, change) in damages.items():
                self.case(f"resume after {name}", ["run", "--resume", "r", "--quiet"], edit(rel, change),
                          may_write=change is None)

    def flags(self):
        """Every numeric or device flag of eval, generate, cache and selftest given bad values,
        on a real (tiny, word-level) model trained here first."""
        with tempfile.TemporaryDirectory() as base:
            base = Path(base)
            words = " ".join(f"w{i % 97} w{(i * 7) % 89}" for i in range(4000))
            (base / "corpus.txt").write_text(words)
            vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(words.split())))}}
            (base / "tok.json").write_text(json.dumps({
                "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
                "post_processor": None, "decoder": None,
                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}))
            (base / "c.toml").write_text(TINY_RUN.replace(
                'kind = "synthetic"\nvocab = 16\ntrain_tokens = 4000\nval_tokens = 400',
                'kind = "text"\npath = "corpus.txt"\ntokenizer = { kind = "hf", path = "tok.json" }'))
            rc, err = run(self.retort, ["run", "c.toml", "--out", "r", "--quiet"], base)
            if rc != 0:
                self.flagged.append(f"word-level run: exit {rc} | {err.strip()[-160:]}")
                return

            def files(d):
                shutil.copytree(base / "r" / "student", d / "m")
                shutil.copy(base / "corpus.txt", d / "corpus.txt")
                shutil.copy(base / "tok.json", d / "tok.json")
                (d / "k.toml").write_text((base / "c.toml").read_text().replace(
                    "[teacher.pretrain]\nsteps = 3\n", "").replace(
                    'kind = "transformer"\nn_layer = 1\nn_embd = 16\nn_head = 2\ncontext = 8',
                    'kind = "transformer"\ncheckpoint = "m"', 1))

            commands = {
                ("eval", "--model", "m", "--data", "corpus.txt", "--seq-len", "8"):
                    ["--val-fraction", "--seq-len", "--batch-size", "--batches", "--device"],
                ("generate", "--model", "m", "--prompt", "w1 w2", "--max-tokens", "3"):
                    ["--max-tokens", "--temperature", "--top-p", "--seed", "--device", "--context"],
                ("cache", "k.toml", "--out", "kc", "--quiet"):
                    ["--k", "--values", "--max-kl", "--levels", "--zstd-level", "--shard-tokens", "--batch"],
                ("selftest",): ["--device", "--filter"],
            }
            for base_args, flags in commands.items():
                for flag in flags:
                    for value in FLAG_VALUES:
                        self.case(f"{base_args[0]} {flag} {value!r}", [*base_args, flag, value], files,
                                  may_write=True)

    def report(self):
        for line in self.flagged:
            print("FLAGGED", line)
        if os.environ.get("VERBOSE"):
            for name in self.accepted:
                print("accepted", name)
        for line in self.runtime:
            print("exit 1 ", line)
        print(f"{self.cases} cases: {len(self.accepted)} accepted, {len(self.flagged)} flagged, "
              f"{len(self.runtime)} exited 1, the rest refused (exit 2)")
        return 1 if self.flagged else 0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    config = sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parent.parent / "examples/configs/quickstart.toml"
    sweep = Sweep(sys.argv[1], config)
    sweep.config_keys()
    sweep.files()
    sweep.run_dirs()
    sweep.flags()
    sys.exit(sweep.report())


if __name__ == "__main__":
    main()
