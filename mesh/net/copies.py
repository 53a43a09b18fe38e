"""Copies of small frames over a second, unreliable channel: a lost packet costs ~1 ms, not an RTO.

A link's data channel is reliable and ordered, so one lost packet holds every later frame until
SCTP retransmits it. For interactive traffic (one small activation per token per hop) there is
no later data to report the gap, so recovery waits out the retransmission timeout: libwebrtc's
is at least 400 ms, aiortc's 1 s. In the lab at 1 % loss single tokens stalled ~470 ms.

So each frame up to ``COPY_MAX`` bytes is also sent, a moment later (``COPY_DELAY``, so the two
do not share an SCTP packet), on a second data channel: negotiated out of band (both sides
create it, nothing to announce), unordered, never retransmitted. The link marks the frames of
bulk messages (over ``LinkParams.copy_up_to``, such as a shard's 2 MiB chunks) not to be
copied; a prompt's activations, cut into frames of a few KiB on a long path, are. A copy
carries the frame's sequence number on the link (the n-th frame sent on the main channel is
frame n; the main channel cannot lose or reorder, so the receiver counts).
:class:`Resequencer` delivers frames in that order whichever channel brings them first and
drops the second.

A peer that does not create the channel gets no copies (ours is never opened, so we send
none); a peer's copies are trusted as its main-channel frames are (same DTLS session).
``mode``: ``on``, ``off``, or ``auto``: on when the candidate pair in use crosses a NAT or a
relay (srflx or relay on either side), and on any path for ``STALL_HOLD`` seconds after the
link saw a stall (a ping far slower than its fastest while nothing else moved:
:class:`mesh.net.stalls.StallWatch`), since a host pair can lose packets too (Wi-Fi, a VPN).
A path within one machine never turns them on; a quiet LAN path pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from mesh.net.engine import RtcChannel

__all__ = [
    "COPY_MODES",
    "COPY_MAX",
    "COPY_DELAY",
    "SPARE_ID",
    "SPARE_LABEL",
    "CopySender",
    "Resequencer",
]

log = logging.getLogger(__name__)

COPY_MODES = ("auto", "on", "off")
COPY_MAX = 16 * 1024  # frames up to this size are copied (a decode step's activation is ~2.5 KiB)
COPY_DELAY = 0.001  # seconds between a frame and its copy: separate SCTP packets
SPARE_ID = 1001  # the negotiated channel's SCTP stream id (in-band channels start at 0/1)
SPARE_LABEL = "edgemesh-copies"
MAX_AHEAD = 64  # copies held for a frame still missing on both channels
WINDOW = 4096  # a copy numbered further ahead than this is nonsense: dropped
_SEQ = struct.Struct(">Q")
_PATH_EVERY = 2.0  # seconds between looks at the candidate pair (auto mode)
STALL_HOLD = 300.0  # seconds copies stay on (auto mode) after the link's last stall


class CopySender:
    """The link's channel (:class:`mesh.net.rpc.Channel`): frames go on ``main``; small ones
    also, numbered, on ``spare`` a moment later."""

    def __init__(
        self,
        main: RtcChannel,
        spare: RtcChannel | None,
        mode: str = "auto",
        path: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        if mode not in COPY_MODES:
            raise ValueError(f"copies mode {mode!r}: one of {', '.join(COPY_MODES)}")
        self._main = main
        self._burst = main.burst
        self._spare = spare
        self._mode = mode
        self._path = path
        self._seq = 0
        self._active = mode == "on"
        self._looked = -_PATH_EVERY
        self._stalled_at: float | None = None
        self.copies_sent = 0
        self.reason = "on" if mode == "on" else None  # why copies are sent, for /v1/peers

    @property
    def label(self) -> str:
        return self._main.label

    @property
    def bufferedAmount(self) -> int:  # noqa: N802 - the WebRTC name
        return self._main.bufferedAmount

    @property
    def burst(self) -> int | None:
        return self._burst

    @property
    def readyState(self) -> str:  # noqa: N802
        return self._main.readyState

    @property
    def active(self) -> bool:
        """Whether small frames are being copied now."""
        now = time.monotonic()
        if self._mode == "auto" and now - self._looked >= _PATH_EVERY:
            self._looked = now
            pair = self._path() or {}
            crosses = bool({pair.get("local"), pair.get("remote")} & {"srflx", "relay"})
            stalled = self._stalled_at is not None and now - self._stalled_at < STALL_HOLD
            self._active = crosses or stalled
            self.reason = "path" if crosses else "stall" if stalled else None
        return self._active and self._spare is not None and self._spare.readyState == "open"

    def stalled(self, sample_ms: float) -> None:
        """The link saw a stall (``sample_ms``: the ping's RTT): in auto mode, copy small
        frames from now on, for ``STALL_HOLD`` seconds after the last one."""
        if self._mode != "auto" or (self._path() or {}).get("same_host"):
            return  # (a path within this machine loses nothing: its slow pings are a busy machine)
        if not self._active:
            log.info("copying small frames: a ping took %.0f ms", sample_ms)
        self._stalled_at = self._looked = time.monotonic()
        self._active = True
        self.reason = self.reason or "stall"

    def send(self, data: bytes, copy: bool = True) -> None:
        """``copy=False``: never copied (a frame of bulk data)."""
        self._main.send(data)
        self._seq += 1
        if copy and len(data) <= COPY_MAX and self._mode != "off" and self.active:
            numbered = _SEQ.pack(self._seq) + data
            asyncio.get_running_loop().call_later(COPY_DELAY, self._send_copy, numbered)

    def _send_copy(self, copy: bytes) -> None:
        spare = self._spare
        if spare is None or spare.readyState != "open":
            return
        try:
            spare.send(copy)
            self.copies_sent += 1
        except Exception as exc:  # a copy is best effort: the main channel has the frame
            log.debug("copy not sent: %s", exc)

    def close(self) -> None:
        self._main.close()
        if self._spare is not None:
            self._spare.close()


class Resequencer:
    """Frames in link order from the main channel and the copies, each delivered once.

    ``main`` takes the main channel's messages (numbered by counting: reliable, ordered);
    ``copy`` the spare channel's (numbered by their prefix). A frame is delivered when it is
    the next one; copies that arrive ahead of a missing frame wait (``MAX_AHEAD`` at most).
    Until :meth:`attach` names where frames go, copies wait too (the peer may finish its
    handshake, and send, before we finish ours)."""

    def __init__(self) -> None:
        self._deliver: Callable[[bytes], None] | None = None
        self._main_count = 0  # frames the main channel brought
        self._done = 0  # frames delivered, in order: 1.._done
        self._ahead: dict[int, bytes] = {}
        self.copies_used = 0  # frames a copy delivered before the main channel did
        self.copies_dropped = 0  # malformed, stale or past the bounds

    def attach(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._drain()

    @property
    def waiting(self) -> int:
        return len(self._ahead)

    def main(self, data: bytes) -> None:
        self._main_count += 1
        if self._main_count <= self._done:  # its copy came first
            return
        self._done = self._main_count  # the main channel lost nothing before it
        self._ahead.pop(self._done, None)
        self._emit(data)
        self._drain()

    def copy(self, data: bytes) -> None:
        if not _SEQ.size < len(data) <= _SEQ.size + COPY_MAX:  # no frame, or one never copied
            self.copies_dropped += 1
            return
        (seq,) = _SEQ.unpack_from(data)
        if seq <= self._done or seq in self._ahead:
            return  # the main channel (or another copy) was first
        if seq > self._done + WINDOW or len(self._ahead) >= MAX_AHEAD:
            self.copies_dropped += 1
            return
        self._ahead[seq] = data[_SEQ.size :]
        self._drain()

    def _drain(self) -> None:
        if self._deliver is None:
            return
        while (frame := self._ahead.pop(self._done + 1, None)) is not None:
            self._done += 1
            self.copies_used += 1
            self._emit(frame)

    def _emit(self, frame: bytes) -> None:
        if self._deliver is not None:
            self._deliver(frame)
