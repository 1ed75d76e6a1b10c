"""LaunchedServer without a server: a client killed by SIGTERM must unwind (its ``with
LaunchedServer`` stops the server, which runs in a session of its own), and the port it picks
must not be one that outgoing connections can take before the server binds it."""

import signal
import subprocess
import sys

CHILD = """
import sys, time
from esamp_sgl.launcher import unwind_on_sigterm
unwind_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    open(sys.argv[1], "w").write("unwound")
"""


def test_sigterm_unwinds_a_client_so_its_server_is_stopped(tmp_path):
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "unwound"


def test_a_handler_someone_installed_is_kept():
    from esamp_sgl.launcher import unwind_on_sigterm
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        unwind_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_server_ports_lie_below_the_ephemeral_range():
    """A TP 2 server's HTTP port from bind(0) was taken by a connection during its 40 s startup
    (CI: "address already in use", then a hang until the health wait gave up)."""
    from esamp_sgl.launcher import free_port
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(1024 <= p < min(ephemeral_low, 22000) for p in ports)
