"""A real Yate for the live tests: configuration in a temporary directory, start/stop, console.

:class:`LiveYate` writes a complete Yate configuration (loopback only, ports chosen free at run
time) with ysipchan, regfile, extmodule, rmanager and cdrbuild, and yate-sipgen in
``extmodule.conf [scripts]`` exactly as the README tells an operator to put it. It starts
``$YATE_PREFIX/bin/yate`` on it, talks to its console through rmanager (:meth:`command`), reads
its log, and finds the script's process so a test can ``kill -9`` it.

Build Yate as the README ("Against a real Yate") says (``./configure --prefix=$PREFIX ... && make install-noapi``)
and export ``YATE_PREFIX=$PREFIX``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "yate-sipgen")
PREFIX = os.environ.get("YATE_PREFIX", "")


def yate_binary(prefix: str = PREFIX) -> str:
    return os.path.join(prefix, "bin", "yate")


def available(prefix: str = PREFIX) -> str:
    """Why the live tests cannot run here, or "" when they can."""
    if not prefix:
        return "YATE_PREFIX is not set (build Yate as the README ('Against a real Yate') says and export it)"
    if not os.access(yate_binary(prefix), os.X_OK):
        return f"YATE_PREFIX={prefix}: no executable {yate_binary(prefix)}"
    return ""


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ini(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k}={v}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out) + "\n"


def _merge(base: dict[str, dict[str, Any]], over: Optional[dict[str, dict[str, Any]]]
           ) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for sect, keys in (over or {}).items():
        if keys is None:
            out.pop(sect, None)
            continue
        out.setdefault(sect, {}).update(keys)
    return out


#: Users known to regfile: name -> password.
USERS = {"123": "pw123", "234": "pw234", "345": "pw345"}


class LiveYate:
    """One Yate instance with yate-sipgen, in ``workdir``.

    ``sipgen``, ``ysipchan``, ``yate``, ``extmodule`` and ``regfile`` are section -> key -> value
    overrides merged into the defaults below (a section mapped to ``None`` is removed).
    ``script_arg`` replaces the [scripts] value (default: the generated sipgen.conf).
    ``regexroute`` is the text of regexroute.conf, written as given (its rules repeat keys such
    as ``.*``, which a dict cannot hold); default: an empty ``[default]`` context.
    """

    def __init__(self, workdir: Path, *, sipgen: Optional[dict] = None,
                 ysipchan: Optional[dict] = None, yate: Optional[dict] = None,
                 extmodule: Optional[dict] = None, regfile: Optional[dict] = None,
                 users: Optional[dict[str, str]] = None, modules: tuple[str, ...] = (),
                 script: str = SCRIPT, prefix: str = PREFIX, tcp: bool = False,
                 regexroute: Optional[str] = None) -> None:
        self.prefix = prefix
        self.workdir = Path(workdir)
        self.conf = self.workdir / "conf"
        self.conf.mkdir(parents=True, exist_ok=True)
        self.state = self.workdir / "state"
        self.log = self.workdir / "yate.log"
        self.sip_port = free_port()
        self.tcp_port = free_port(socket.SOCK_STREAM) if tcp else 0
        self.rman_port = free_port(socket.SOCK_STREAM)
        self.script = script
        self.sipgen_conf = self.workdir / "sipgen.conf"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.users = dict(USERS if users is None else users)
        self.regexroute_text = regexroute
        self._log_pos = 0
        mods = {m: "yes" for m in ("ysipchan.yate", "regfile.yate", "extmodule.yate",
                                   "rmanager.yate", "cdrbuild.yate") + tuple(modules)}
        self.yate_cfg = _merge({"general": {"modload": "no"}, "modules": mods}, yate)
        sip_general = {"addr": "127.0.0.1", "port": self.sip_port, "generate": "true",
                       "async_generic": "true", "maxpkt": "8192", "initial_headers": "yes"}
        base_sip: dict[str, dict[str, Any]] = {
            "general": sip_general, "methods": {"message": "yes"},
            "message": {"enable": "no"}, "options": {"enable": "yes"}}
        if tcp:
            base_sip["listener udp"] = {"type": "udp", "addr": "127.0.0.1",
                                        "port": self.sip_port, "default": "yes"}
            base_sip["listener tcp"] = {"type": "tcp", "addr": "127.0.0.1",
                                        "port": self.tcp_port}
        self.ysipchan_cfg = _merge(base_sip, ysipchan)
        reg: dict[str, dict[str, Any]] = {"general": {"file": str(self.workdir / "regs.conf")}}
        for u, pw in self.users.items():
            reg[u] = {"password": pw}
        self.regfile_cfg = _merge(reg, regfile)
        self.extmodule_cfg = _merge({"general": {"timeout": "10000"},
                                     "scripts": {self.script: str(self.sipgen_conf)}},
                                    extmodule)
        self.sipgen_cfg = _merge({"general": {"state_dir": str(self.state)},
                                  "message": {"domains": "127.0.0.1"}}, sipgen)
        self.write_configs()

    # -- configuration -----------------------------------------------------------------------
    def write_configs(self) -> None:
        files = {
            "yate.conf": self.yate_cfg,
            "ysipchan.conf": self.ysipchan_cfg,
            "regfile.conf": self.regfile_cfg,
            "extmodule.conf": self.extmodule_cfg,
            "rmanager.conf": {"general": {"port": self.rman_port, "addr": "127.0.0.1",
                                          "telnet": "no", "output": "no", "debug": "no",
                                          "logged": "no"}},
            "cdrbuild.conf": {"general": {"updates": "true"}},
            "regexroute.conf": {"default": {}},
        }
        for name, sections in files.items():
            (self.conf / name).write_text(_ini(sections))
        if self.regexroute_text is not None:
            (self.conf / "regexroute.conf").write_text(self.regexroute_text)
        self.sipgen_conf.write_text(_ini(self.sipgen_cfg))

    def set_sipgen(self, section: str, **keys: Any) -> None:
        self.sipgen_cfg.setdefault(section, {}).update(keys)
        self.sipgen_conf.write_text(_ini(self.sipgen_cfg))

    # -- process -----------------------------------------------------------------------------
    def start(self, timeout: float = 20.0, wait_installed: Optional[str] = "sip.message",
              verbosity: str = "-vvvvv") -> None:
        """Start Yate; wait for rmanager and (unless ``wait_installed`` is None) yate-sipgen.

        ``verbosity`` is Yate's debug-level option: ``"-vvvvv"`` (the default) logs everything
        (level 10), ``"-v"`` level 8, ``""`` Yate's default level 7 (notes, warnings and
        alarms such as "did not return in" still appear). Load runs use a low level so that
        writing the log does not dominate Yate's CPU.
        """
        env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(self.prefix, "lib"))
        cmd = [yate_binary(self.prefix), "-c", str(self.conf),
               "-m", os.path.join(self.prefix, "lib", "yate"),
               "-e", os.path.join(self.prefix, "share", "yate"),
               "-l", str(self.log)] + ([verbosity] if verbosity else []) + [
               "-Df", "-n", "yate"]
        self._log_pos = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(cmd, cwd=str(self.workdir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"yate exited with {self.proc.returncode}: "
                                   f"{self.log_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.rman_port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("yate's rmanager did not come up")
        self.wait_sip(timeout=max(deadline - time.monotonic(), 1))
        if wait_installed:
            self.wait_installed(wait_installed, timeout=max(deadline - time.monotonic(), 1))

    def wait_sip(self, timeout: float = 10.0) -> None:
        """Until ysipchan answers on its UDP port. rmanager can be up before ysipchan's
        listener has bound it, and the test phones do not retransmit: a REGISTER sent in that
        gap was lost and its row failed on a 15 s timeout (seen in a load run)."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.settimeout(0.1)
            n = 0
            while time.monotonic() < deadline:
                n += 1
                probe = (f"OPTIONS sip:127.0.0.1:{self.sip_port} SIP/2.0\r\n"
                         f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKprobe{n}\r\n"
                         f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p{n}\r\n"
                         f"To: <sip:127.0.0.1>\r\nCall-ID: probe{n}.{port}@127.0.0.1\r\n"
                         f"CSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n")
                try:
                    sock.sendto(probe.encode(), self.server)
                    if sock.recv(65536).startswith(b"SIP/2.0 "):
                        return  # any answer: the listener is up
                except (socket.timeout, ConnectionRefusedError):
                    pass  # not bound yet (or the ICMP of an earlier probe)
        raise RuntimeError(f"ysipchan did not answer on port {self.sip_port} within "
                           f"{timeout}s:\n{self.log_text()[-3000:]}")

    def wait_installed(self, name: str, timeout: float = 10.0) -> None:
        """Until yate-sipgen has installed ``name`` (seen in ``status sipgen``... or the log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.script_running() and "name=sipgen" in self.command("status sipgen"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"yate-sipgen did not come up within {timeout}s:\n"
                           f"{self.log_text()[-4000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Yate as an operator does (SIGTERM: Yate's orderly halt)."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._reap_scripts()

    def kill(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._reap_scripts(signal.SIGKILL)

    def _reap_scripts(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.script_pids(any_parent=True):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def script_pids(self, any_parent: bool = False) -> list[int]:
        """Pids of yate-sipgen processes started for this instance (argv[1] = our conf)."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if str(self.sipgen_conf).encode() not in argv:
                continue
            if stat[0] == "Z":
                continue
            if any_parent or (self.proc is not None and int(stat[1]) == self.proc.pid):
                out.append(int(d))
        return out

    def script_running(self) -> bool:
        return bool(self.script_pids())

    def kill_script(self) -> int:
        pids = self.script_pids()
        if not pids:
            raise RuntimeError("yate-sipgen is not running")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids[0]

    # -- console -----------------------------------------------------------------------------
    def command(self, line: str, timeout: float = 10.0) -> str:
        """One rmanager command; its output (up to a sentinel command's answer)."""
        marker = f"zzsentinel{time.monotonic_ns()}"
        with socket.create_connection(("127.0.0.1", self.rman_port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"{line}\r\n{marker}\r\n".encode())
            data = b""
            end = f"Cannot understand: {marker}".encode()
            while end not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.sendall(b"quit\r\n")
        text = data.decode("utf-8", "replace")
        # drop the banner line and the sentinel's answer
        lines = text.split("\r\n")
        lines = [ln for ln in lines if not re.search(r"^\W*YATE .* ready on ", ln)]
        text = "\r\n".join(lines)
        return text.split(f"Cannot understand: {marker}")[0]

    # -- log ---------------------------------------------------------------------------------
    def log_text(self, since_start: bool = True) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[self._log_pos if since_start else 0:].decode("utf-8", "replace")

    def wait_log(self, pattern: str, timeout: float = 10.0, since_start: bool = True) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.log_text(since_start))
            if m:
                return m.group(0)
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in Yate's log within {timeout}s:\n"
                             f"{self.log_text()[-4000:]}")

    @property
    def server(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sip_port)

    def __enter__(self) -> "LiveYate":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


async def wait_for(pred, timeout: float = 10.0, what: str = "condition", step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
