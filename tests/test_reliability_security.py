"""Security of a running daemon: file modes, CURVE against a real second client, no code from the wire.

Already covered elsewhere (not repeated): a non-loopback bind without CURVE is refused (``test_bus.py``,
``test_daemon_cli.py``); a CURVE daemon ignores the *requests* of unknown keys (``test_bus.py``,
``test_tui_client.py``); the runtime dir is tightened to 0700 and records are 0600 (``test_daemon_registry.py``).
Added here: what a real daemon creates when started with umask 000 (runtime dir, ipc sockets, run dir, events,
journal, checkpoints), a CURVE daemon's *event stream* refusing a subscriber whose key is not allowed while an
allowed one is served, a scan of the packages for pickle/eval/exec/dynamic imports, and hostile class paths over the
socket (nothing outside the allowed prefixes is ever imported).
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.client import Control, ControlError, CurveClientKeys, Follower

from .daemon_support import SCHEDULE, wait_for, write_config
from .reliability_support import REPO, DaemonProcess, env_for, figure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FINDINGS: list[str] = []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("sec")
    runtime = base / "rt"  # not created: the daemon creates it
    env = env_for(runtime)
    cfg = write_config(base / "cfg", SCHEDULE, step_delay=0.1, max_epochs=30, name="sec")
    proc = DaemonProcess.start("sec", base / "run", env, config=cfg, preexec_fn=lambda: os.umask(0))
    rec = proc.record()
    with Control(rec.ctl, timeout=20) as ctl:
        wait_for(lambda: (ctl.request("hello")["step"] or 0) >= 5, timeout=90)
        ctl.request("queue_edit", phase=2, changes={"lr": 1.0e-3})  # so that the journal exists
    yield {"base": base, "runtime": runtime, "proc": proc, "rec": rec, "env": env}
    proc.signal(15)
    proc.wait(60)


def test_files_and_sockets_are_private_even_with_umask_000(daemon: Any) -> None:
    runtime, run_dir = daemon["runtime"], daemon["base"] / "run"
    rec = daemon["rec"]
    pub, ctl = (Path(e[len("ipc://"):]) for e in (rec.pub, rec.ctl))
    assert stat.S_ISSOCK(pub.lstat().st_mode) and stat.S_ISSOCK(ctl.lstat().st_mode)
    modes = {"runtime dir": mode(runtime), "pub socket": mode(pub), "ctl socket": mode(ctl),
             "run record": mode(runtime / "sec.json")}
    assert modes == {"runtime dir": 0o700, "pub socket": 0o600, "ctl socket": 0o600, "run record": 0o600}, modes
    written = [run_dir, run_dir / "events.jsonl", run_dir / "edits.jsonl", run_dir / "config.yaml",
               run_dir / "checkpoints" / "last.ckpt"]
    for path in written:
        modes[str(path.relative_to(run_dir.parent))] = mode(path)
        assert not mode(path) & (stat.S_IWGRP | stat.S_IWOTH), f"{path} is {oct(mode(path))}"
    FINDINGS.append("umask 000: " + ", ".join(f"{k} {oct(v)[2:]}" for k, v in modes.items()))


def test_hostile_class_paths_over_the_socket_are_refused_before_import(daemon: Any) -> None:
    hostile = ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "pickle.loads", "this.Zen",
               "importlib.import_module", "torch.optim.lr_scheduler.os.system", "torch.optim.lr_scheduler.warnings.warn",
               "torch.load", "__import__('os').system"]
    refused = 0
    with Control(daemon["rec"].ctl, timeout=20) as ctl:
        for path in hostile:
            for changes in ({"new_lr_scheduler": {"lr_scheduler_init": {"class_path": path,
                                                                        "init_args": {"command": "true"}}}},
                            {"new_optimizer": {"optimizer_init": {"class_path": path}}}):
                with pytest.raises(ControlError) as info:
                    ctl.request("queue_edit", phase=2, changes=changes)
                message = str(info.value)
                assert "outside the allowed prefixes" in message or "cannot import module" in message, message
                refused += 1
        # a pickle on the wire is only ever bytes that are not JSON
        ctl.sock.send(b"\x80\x04\x95" + os.urandom(32))
        assert ctl.sock.poll(5000)
        assert "not valid UTF-8 JSON" in ev.parse_reply(ctl.sock.recv())[2]
        edits = ctl.request("list_edits")["edits"]
    assert [e["changes"] for e in edits] == [{"lr": 1.0e-3}]  # only the edit queued by the fixture
    assert "Beautiful is better than ugly" not in daemon["proc"].output()  # `this` was never imported
    FINDINGS.append(f"{refused} hostile class paths refused before import; a pickle frame refused as not JSON")


# every module of both packages: nothing deserializes with pickle, evaluates text or imports by name, except
# reinit.import_class (prefix-checked before it imports, tested above over the socket) and the MiniLM example
# model, which imports the classes its own YAML config names (a local file, like every LightningCLI class_path;
# nothing from the wire reaches it)
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "importlib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
ALLOWED = {("fts_daemon/reinit.py", "importlib"), ("fts_daemon/examples/minilm.py", "importlib")}


def scan(path: Path) -> list[str]:
    rel = path.relative_to(REPO).as_posix()
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in FORBIDDEN_MODULES and (rel, name) not in ALLOWED:
                problems.append(f"{rel}:{node.lineno}: imports {name}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                problems.append(f"{rel}:{node.lineno}: calls {func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                if (owner, func.attr) in {("torch", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                                          ("builtins", "eval"), ("builtins", "exec")}:
                    problems.append(f"{rel}:{node.lineno}: calls {owner}.{func.attr}()")
                if (owner, func.attr) == ("yaml", "load"):
                    loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                    if not (isinstance(loader, ast.Name) and loader.id in ("_StrictLoader", "SafeLoader")):
                        problems.append(f"{rel}:{node.lineno}: yaml.load without a safe loader")
    return problems


def test_no_pickle_eval_or_dynamic_import_in_the_packages() -> None:
    files = sorted([*(REPO / "fts_daemon").rglob("*.py"), *(REPO / "fts_tui").rglob("*.py")])
    problems = [p for f in files for p in scan(f)]
    assert not problems, problems
    # and the one dynamic import checks the prefix first: nothing is imported for a refused path
    code = ("import sys\nfrom fts_daemon.reinit import ReinitError, import_class\n"
            "for path in ('this.Zen', 'os.system', 'antigravity.fly'):\n"
            "    try:\n        import_class(path, ['torch.optim.'])\n    except ReinitError:\n        pass\n"
            "print(sorted(m for m in ('this', 'antigravity') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    FINDINGS.append(f"{len(files)} modules scanned: no pickle/marshal, eval/exec/compile/__import__, torch.load or "
                    "unsafe YAML; importlib only in reinit.import_class (after the prefix check) and the MiniLM example "
                    "(classes named by its own config)")


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_daemon_serves_only_allowed_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"  # the server's pair, the allowed clients' public keys, and a key nobody allowed
    for directory, name in ((keys, "server"), (keys / "authorized_clients", "friend"), (tmp_path, "stranger")):
        directory.mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(directory, name)
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    cfg = write_config(tmp_path / "cfg", SCHEDULE, step_delay=0.05, max_epochs=30, name="curve")
    proc = DaemonProcess.start("curve", tmp_path / "run", env, config=cfg,
                               extra=["--pub", "tcp://127.0.0.1:0", "--ctl", "tcp://127.0.0.1:0", "--curve-dir",
                                      str(keys)])
    try:
        rec = proc.record()
        assert rec.curve_server_key and registry.read_record("curve", runtime).curve_server_key == rec.curve_server_key
        server = rec.curve_server_key.encode()
        fpub, fsec = zmq.auth.load_certificate(keys / "authorized_clients" / "friend.key_secret")
        spub, ssec = zmq.auth.load_certificate(tmp_path / "stranger.key_secret")
        friend = CurveClientKeys(server_public=server, public=fpub, secret=fsec)
        stranger = CurveClientKeys(server_public=server, public=spub, secret=ssec)
        forged = CurveClientKeys(server_public=server, public=fpub, secret=ssec)  # an allowed public key, wrong secret

        ctx = zmq.Context()
        subs = {}
        for name, creds in (("stranger", stranger), ("forged", forged), ("plain", None)):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if creds is not None:
                creds.apply(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(rec.pub)
            subs[name] = sub
        # the allowed client follows the run (snapshot, then live events)
        got = 0
        with Follower(rec.pub, rec.ctl, curve=friend) as follower:
            for kind, _ in follower.follow(timeout=20):
                got += kind == "event"
                if got >= 20:
                    break
            assert follower.snapshots >= 1
        assert got >= 20
        time.sleep(1.0)
        received = {name: sub.poll(0) for name, sub in subs.items()}
        for creds in (stranger, forged):
            with Control(rec.ctl, timeout=1.0, curve=creds) as ctl, pytest.raises(ControlError, match="no reply"):
                ctl.request("stop")
        for sub in subs.values():
            sub.close(0)
        ctx.term()
        assert not any(received.values()), received
        with Control(rec.ctl, timeout=10, curve=friend) as ctl:
            assert ctl.request("hello")["state"] == "training"  # the refused `stop`s never arrived
            ctl.request("stop")
        assert proc.wait(60) == 0
    finally:
        proc.ensure_dead()
    FINDINGS.append("CURVE daemon: the allowed key followed the run and stopped it; an unknown key, an allowed "
                    "public key with the wrong secret and a plain-text client got no event and no reply")


def test_security_summary() -> None:
    if not FINDINGS:
        pytest.skip("run with the other security tests")
    figure("security", "; ".join(FINDINGS))
