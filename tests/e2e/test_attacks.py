"""The hardening issue's bounds, measured with bench/attacks.py against real relayd processes.

Each test runs one attack of ``bench.attacks`` at moderate sizes and checks the issue's generous
bounds: relayd grows by less than 256 MiB, the echo probe (a tunnel's round trip, i.e. relayd's
event-loop stall seen from outside) stays under 0.5 s, plus what the attack is about.  Every
figure that breaks a bound is named in the failure message with the attack's other figures.

``RELAY_CODE_DIR=/path/to/checkout`` measures the relayd and relayc of another checkout (for
example the one before the hardening work) with this checkout's harness; default: this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bench import attacks

CODE_DIR = Path(os.environ.get("RELAY_CODE_DIR") or attacks.ROOT).resolve()
MIB = attacks.MIB
MAX_RSS_GROWTH_MIB = 256.0
MAX_STALL_MS = 500.0
RSS_CAP_MIB = 512.0  # an attack ends early once relayd grew this much (clearly over the bound)


def bound_problems(name: str, figs: dict[str, Any], prefix: str = "") -> list[str]:
    """The common bounds: RSS growth and event-loop stall (a probe with no sample says nothing)."""
    if "error" in figs:
        return [f"{name}: the attack did not run: {figs['error']}"]
    problems = []
    growth = figs[f"{prefix}rss_growth_mib"]
    if growth >= MAX_RSS_GROWTH_MIB:
        capped = " (stopped at the safety cap: at least that)" if figs.get(f"{prefix}rss_capped") else ""
        problems.append(f"{name}: relayd grew by {growth} MiB{capped}, bound {MAX_RSS_GROWTH_MIB:g}")
    stall = figs[f"{prefix}probe_max_rtt_ms"]
    if stall >= MAX_STALL_MS:
        problems.append(f"{name}: echo probe max RTT {stall} ms (p99 {figs[f'{prefix}probe_p99_rtt_ms']} ms), "
                        f"bound {MAX_STALL_MS:g} ms")  # fmt: skip
    if figs.get("relayd_alive") == 0:
        problems.append(f"{name}: relayd died")
    return problems


def report(problems: list[str], results: dict[str, dict[str, Any]]) -> str:
    lines = [*problems, "", f"code measured: {CODE_DIR}"]
    for name, figs in results.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figs.items()))
    return "\n".join(lines)


def test_sni_dribble_input_is_a_whole_client_hello_in_one_byte_records() -> None:
    """The harness's attack F input: a real ClientHello (grown with a padding extension), whose
    length fields add up, cut into TLS handshake records of one byte each."""
    for size in (10_000, 0):
        handshake = attacks.padded_handshake("dribble.example.org", size)
        assert handshake[0] == 1  # ClientHello
        assert int.from_bytes(handshake[1:4], "big") == len(handshake) - 4
        if size:
            assert len(handshake) == size
        body = handshake[4:]
        pos = 2 + 32
        pos += 1 + body[pos]
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 1 + body[pos]
        assert pos + 2 + int.from_bytes(body[pos : pos + 2], "big") == len(body)  # extensions end the body
        assert b"dribble.example.org" in body
        wire = attacks.dribble(handshake)
        records = [wire[i : i + 6] for i in range(0, len(wire), 6)]
        assert all(r[:5] == b"\x16\x03\x01\x00\x01" for r in records)
        assert b"".join(r[5:] for r in records) == handshake


@pytest.mark.slow
def test_a_prelogin_non_reader_is_bounded() -> None:
    """40 TLS connections that never log in nor read flood PINGs or stream openings (2 MiB each)."""
    results = {
        f"A-{kind}": attacks.attack_a(
            CODE_DIR, kind=kind, conns=40, max_bytes=2 * MIB, limit_s=30, rss_cap_mib=RSS_CAP_MIB
        )
        for kind in ("ping", "streams")
    }
    problems = [p for name, figs in results.items() for p in bound_problems(name, figs)]
    assert not problems, report(problems, results)


@pytest.mark.slow
def test_b_logged_in_non_reader_is_bounded() -> None:
    """A logged-in client that never reads floods PINGs (up to 256 MiB) or stream openings (64 MiB)."""
    results = {
        "B-ping": attacks.attack_b(
            CODE_DIR, kind="ping", max_bytes=256 * MIB, limit_s=30, wait_close_s=5, rss_cap_mib=RSS_CAP_MIB
        ),
        "B-streams": attacks.attack_b(
            CODE_DIR, kind="streams", max_bytes=64 * MIB, limit_s=20, wait_close_s=5, rss_cap_mib=RSS_CAP_MIB
        ),
    }
    problems = [p for name, figs in results.items() for p in bound_problems(name, figs)]
    assert not problems, report(problems, results)


@pytest.mark.slow
def test_c_withholding_control_credit_gets_disconnected() -> None:
    """A client that never grants credit on the control stream and keeps sending tunnel_add."""
    figs = attacks.attack_c(CODE_DIR, messages=50_000, wait_s=30, limit_s=40, rss_cap_mib=RSS_CAP_MIB)
    problems = bound_problems("C", figs)
    if "error" not in figs and not (figs["disconnected"] and figs["disconnected_after_s"] <= 30):
        problems.append(f"C: relayd did not disconnect the client within 30 s (disconnected={figs['disconnected']},"
                        f" after {figs['disconnected_after_s']} s)")  # fmt: skip
    assert not problems, report(problems, {"C": figs})


@pytest.mark.slow
def test_d_visitor_upload_through_a_stalled_client_is_bounded() -> None:
    """Visitors of every kind upload up to 1 GiB through a client that granted a huge window and
    stopped reading."""
    results = {
        f"D-{kind}": attacks.attack_d(CODE_DIR, kind=kind, upload_bytes=1 << 30, limit_s=40, rss_cap_mib=RSS_CAP_MIB)
        for kind in ("tcp", "http", "https")
    }
    problems = [p for name, figs in results.items() for p in bound_problems(name, figs)]
    assert not problems, report(problems, results)


def test_d_many_visitors_through_a_client_that_returns_no_credit_are_bounded() -> None:
    """A client reads its connection but never returns credit; 1,000 visitors upload through it.
    What waits for its credit is capped per session (16 MiB; new visitors are turned away past
    64 MiB): without the cap each stream held up to a window and a read (284 MiB for 600 before)."""
    figs = attacks.attack_d_many(CODE_DIR, visitors=1000, per_visitor=4 * MIB, limit_s=40, rss_cap_mib=RSS_CAP_MIB)
    problems = bound_problems("D-many", figs)
    if "error" not in figs and figs["rss_growth_mib"] >= 128:
        problems.append(f"D-many: relayd grew by {figs['rss_growth_mib']} MiB, over the session cap's 128 MiB")
    assert not problems, report(problems, {"D-many": figs})


@pytest.mark.slow
def test_e_registering_and_removing_many_tunnels_costs_linear_time() -> None:
    """5,000 http + 1,000 tcp tunnels (the issue's N) registered in a few writes, then dropped with the connection;
    the same at a quarter.  Neither phase stalls the loop; removal CPU grows about linearly."""
    figs = attacks.attack_e(CODE_DIR, n_http=5000, n_tcp=1000, remove_wait_s=60)
    problems: list[str] = []
    if "error" in figs:
        problems.append(f"E: the attack did not run: {figs['error']}")
    else:
        for phase in ("reg_", "rm_", "q_reg_", "q_rm_"):
            problems += bound_problems(f"E {phase.rstrip('_')}", figs, phase)
        if figs["reg_missing"]:
            why = f" (relayd closed the session: {figs['reg_close_reason']})" if figs["reg_closed_by_relayd"] else ""
            problems.append(f"E: {figs['reg_missing']} tunnel_add messages got no tunnel_status{why}")
        if figs["rm_time_s"] < 0:
            problems.append("E: relayd did not log the client's disconnect within 60 s")
        # the ratio is only meaningful when the quarter run took measurable CPU (ticks are 10 ms)
        if figs["q_rm_cpu_s"] >= 0.3 and figs["ratio_rm_cpu_s"] > 10:
            problems.append(f"E: removal CPU grew {figs['ratio_rm_cpu_s']}x for 4x the tunnels (linear: ~4x)")
    assert not problems, report(problems, {"E": figs})


@pytest.mark.slow
def test_f_sni_dribble_does_not_stall_relayd() -> None:
    """50 visitors send 10 kB ClientHellos in 1-byte TLS records, again and again, for 10 s."""
    figs = attacks.attack_f(CODE_DIR, conns=50, hello_size=10_000, duration_s=10)
    problems = bound_problems("F", figs)
    assert not problems, report(problems, {"F": figs})


@pytest.mark.slow
def test_g_parallel_password_guesses_get_no_more_tries_and_lead_to_a_block() -> None:
    """40 threads guess the dashboard password with HTTP Basic for 10 s, then 1 thread on a fresh
    relayd; right after the parallel run even the right password is not accepted (the address is
    blocked: refused, or not answered within 15 s), parallel guessing got no more checks than serial
    (+2), and tunnels kept their latency."""
    figs = attacks.attack_g(CODE_DIR, threads=40, duration_s=10, answer_timeout_s=15)
    problems = bound_problems("G (parallel run)", figs, "par_")
    if "error" not in figs:
        if figs["correct_password_after_par_accepted"]:
            problems.append(f"G: right after the parallel guessing the correct password was accepted "
                            f"(HTTP {figs['correct_password_after_par_status']}), not refused")  # fmt: skip
        if figs["par_checked"] > figs["ser_checked"] + 2:
            problems.append(f"G: {figs['par_checked']} guesses checked with 40 in parallel against "
                            f"{figs['ser_checked']} serially in the same time")  # fmt: skip
    assert not problems, report(problems, {"G": figs})


@pytest.mark.slow
def test_h_visitor_withholding_credit_from_a_secret_tunnel_is_bounded() -> None:
    """A service behind a secret tunnel pours up to 1 GiB into each of 20 visits whose visitor (a
    raw client logged in as an allowed name) never returns credit, reading its connection or not
    reading at all.  The pouring stalls after a few windows and socket buffers per visit: far below
    64 MiB per visit, so relayd did not take it in."""
    visits = 20
    results = {
        f"H-{kind}": attacks.attack_h(
            CODE_DIR, reading=kind == "credit", visits=visits, pour_bytes=1 << 30, limit_s=40, rss_cap_mib=RSS_CAP_MIB
        )
        for kind in ("credit", "noread")
    }
    problems = [p for name, figs in results.items() for p in bound_problems(name, figs)]
    for name, figs in results.items():
        if "error" in figs:
            continue
        if figs["visits_ok"] != visits or figs["pour_conns"] != visits:
            problems.append(f"{name}: {figs['visits_ok']} of {visits} visits admitted, "
                            f"{figs['pour_conns']} reached the service")  # fmt: skip
        if figs["poured_mib"] <= 0:
            problems.append(f"{name}: the service sent nothing: the visits carried no bytes")
        if figs["outcome"] != "stalled" or figs["poured_mib"] >= 64 * visits:
            problems.append(f"{name}: the service poured {figs['poured_mib']} MiB into {visits} visits "
                            f"(outcome {figs['outcome']}), bound {64 * visits} MiB")  # fmt: skip
    assert not problems, report(problems, results)
