"""LaunchedServer's SIGTERM handling, without a server: a client killed by SIGTERM must unwind
(its ``with LaunchedServer`` stops the server, which runs in a session of its own)."""

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
