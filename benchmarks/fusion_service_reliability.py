"""The fusion service under hostile and long load, measured from outside: each phase starts its own
`deepnav fusion serve` process (the shipped model, the built-in synthetic patient) and loads it
over loopback OpenIGTLink from this one; the service's resident memory, descriptors and threads
are read from /proc.

- dribble: one, then three clients announce a ~1 GiB IMAGE and send one byte a second
  (target: < 64 MB for one, < 200 MB for three);
- limit: 200 idle clients against the default --max-clients (refused beyond it, threads bounded);
- descriptors: the service under a descriptor limit of 128 (prlimit) and --max-clients 1000;
  160 idle clients exhaust it, then leave (target: a valid frame answered within 10 s after);
- soak: --frames valid 128^3 frames at --rate Hz on one connection (target: the last quarter's
  median resident memory within 50 MB of the second quarter's);
- fuzz: --fuzz malformed messages, a valid frame after every --valid-every (target: no crash,
  every valid frame answered, every message that keeps the stream in sync answered by a STATUS).

    python benchmarks/fusion_service_reliability.py --json benchmarks/results/fusion_service_reliability_cpu.json

`--phases` runs some of them; `--child-env NAME=VALUE` sets an environment variable of the
service processes (e.g. MALLOC_ARENA_MAX=2, to compare allocator settings).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

from deepnav.child_process import ChildTask, child_environment, deepnav_command  # noqa: E402
from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.torch_runtime import machine_description  # noqa: E402
from MRUSFusionLib import igtl_messages as msgs  # noqa: E402
from MRUSFusionLib.demo import DEMO_PATIENT_SEED  # noqa: E402
from MRUSFusionLib.igtl_messages import DEVICE_REPORT  # noqa: E402
from MRUSFusionLib.igtl_transport import Connection, MessageReader  # noqa: E402
from MRUSFusionLib.phantom import make_patient  # noqa: E402
from MRUSFusionLib.service_process import _listening, free_port  # noqa: E402
from MRUSFusionLib.service_stress import dribble, fuzz, soak  # noqa: E402
from MRUSFusionLib.stream_benchmark import ProcessSampler, bench_volume, process_figures  # noqa: E402

HOST = "127.0.0.1"
PHASES = ("dribble", "limit", "descriptors", "soak", "fuzz")


class Service:
    """`deepnav fusion serve` in a process of its own, on a free port; `stages`: `--fast` (the
    network's results only, as the figures in the README were measured) or nothing (the service's
    default: each frame's corrected result follows)."""

    stages: tuple[str, ...] = ("--fast",)

    def __init__(self, *args: str, env: dict[str, str], nofile: int | None = None):
        self.port = free_port()
        command = deepnav_command("fusion", "serve", "--host", HOST, "--port", str(self.port), "--device", "cpu",
                                  *self.stages, *args)
        if nofile is not None:
            command = ["prlimit", f"--nofile={nofile}:{nofile}", *command]
        self.task = ChildTask(command, env=env)
        self.pid = self.task.pid
        deadline = time.monotonic() + 300
        while not _listening(HOST, self.port):
            if self.task.done or time.monotonic() > deadline:
                raise RuntimeError("the service did not start:\n" + "\n".join(self.task.lines))
            time.sleep(0.5)
        time.sleep(1.0)  # the probe connection's reader has left

    @property
    def alive(self) -> bool:
        return not self.task.done

    def figures(self) -> dict:
        return process_figures(self.pid)

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.task.lines if text in line]

    def close(self) -> None:
        self.task.cancel()
        self.task.wait(30)


def answered_within(port: int, volume, timeout_s: float) -> float | None:
    """Seconds until a valid frame on a new connection gets its report, or None."""
    t0 = time.monotonic()
    try:
        reader = MessageReader(Connection.connect(HOST, port, timeout_s=timeout_s))
    except OSError:
        return None
    try:
        reader.conn.send(msgs.volume_to_image(volume.array, volume, "US", time.time()))
        got = reader.wait_for(lambda m: getattr(m, "device_name", "") == DEVICE_REPORT
                              or getattr(m, "message_type", "") == "STATUS", timeout_s)
        return time.monotonic() - t0 if got[-1].device_name == DEVICE_REPORT else None
    except Exception:
        return None
    finally:
        reader.close()


def idle_clients(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection((HOST, port), timeout=2))
        except OSError:
            break
    return socks


def _refused(sock: socket.socket) -> bool:
    """The service said it refused this connection (a STATUS), and closed it."""
    sock.settimeout(1.0)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        return False  # still open: served
    return b"refused" in data


def phase_dribble(env, volume) -> dict:
    service = Service(env=env)
    try:
        one = dribble(HOST, service.port, clients=1, pid=service.pid, byte_every_s=1.0, hold_s=60)
        time.sleep(2)
        three = dribble(HOST, service.port, clients=3, pid=service.pid, byte_every_s=1.0, hold_s=60)
        return {"one": one, "three": three, "then_answered_s": answered_within(service.port, volume, 60),
                "log": service.log_lines("too slow")[:3]}
    finally:
        service.close()


def phase_limit(env, volume, clients: int = 200) -> dict:
    service = Service(env=env)
    try:
        before = service.figures()
        socks = idle_clients(service.port, clients)
        time.sleep(3)
        during = service.figures()
        answered = answered_within(service.port, volume, 60)  # refused too: the limit is full
        refused = sum(_refused(sock) for sock in socks)
        for sock in socks:
            sock.close()
        time.sleep(2)
        after_s = answered_within(service.port, volume, 60)
        return {"idle_clients": len(socks), "max_clients": 8, "refused": refused, "before": before, "during": during,
                "answered_while_full": answered is not None, "answered_after_they_left_s": after_s,
                "log": service.log_lines("refused client")[:1]}
    finally:
        service.close()


def phase_descriptors(env, volume, limit: int = 128, clients: int = 160) -> dict:
    service = Service("--max-clients", "1000", env=env, nofile=limit)
    try:
        socks = idle_clients(service.port, clients)
        time.sleep(3)
        during = service.figures()
        t_release = time.monotonic()
        for sock in socks:
            sock.close()
        answered_s = answered_within(service.port, volume, 30)
        return {"nofile_limit": limit, "idle_clients": len(socks), "during": during,
                "answered_after_release_s": None if answered_s is None else time.monotonic() - t_release,
                "alive": service.alive, "log": service.log_lines("accept")[:2]}
    finally:
        service.close()


def phase_soak(env, volume, frames: int, rate: float) -> dict:
    service = Service(env=env)
    try:
        result = soak(HOST, service.port, volume, frames=frames, rate_hz=rate, pid=service.pid)
        return {**result, "alive": service.alive}
    finally:
        service.close()


def phase_fuzz(env, volume, messages: int, valid_every: int) -> dict:
    service = Service(env=env)
    try:
        with ProcessSampler(service.pid, 0.25) as sampler:
            result = fuzz(HOST, service.port, volume, messages=messages, valid_every=valid_every, seed=0,
                          alive=lambda: service.alive, log=print)
        time.sleep(2)
        return {**result, "process": sampler.summary(), "after": service.figures() if service.alive else None,
                "alive": service.alive}
    finally:
        service.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--frames", type=int, default=1000, help="soak: valid frames")
    parser.add_argument("--rate", type=float, default=4.0, help="soak: frames per second")
    parser.add_argument("--size", type=int, default=128, help="valid frames: cubic uint8 size")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzz: malformed messages")
    parser.add_argument("--valid-every", type=int, default=800, help="fuzz: a valid frame after this many")
    parser.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--corrections", action="store_true",
                        help="services with their default corrected results (default: --fast, the network's alone)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    env = child_environment("MRUSFusionLib")
    env.update(item.split("=", 1) for item in args.child_env)
    Service.stages = () if args.corrections else ("--fast",)
    volume = bench_volume(make_patient(DEMO_PATIENT_SEED, frames=1).frames[0].image, args.size)
    report = {"command": " ".join(sys.argv), "child_env": args.child_env, "volume": f"{args.size}^3 uint8",
              "machine": machine_description(), "phases": {}}
    for phase in args.phases:
        print(f"{phase}...", flush=True)
        t0 = time.perf_counter()
        if phase == "dribble":
            result = phase_dribble(env, volume)
        elif phase == "limit":
            result = phase_limit(env, volume)
        elif phase == "descriptors":
            result = phase_descriptors(env, volume)
        elif phase == "soak":
            result = phase_soak(env, volume, args.frames, args.rate)
        else:
            result = phase_fuzz(env, volume, args.fuzz, args.valid_every)
        result["seconds"] = time.perf_counter() - t0
        report["phases"][phase] = result
        print(json.dumps(result, indent=1, default=float)[:3000], flush=True)
        write_json(report, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
