"""Make untrusted output safe to print on a terminal (``spotrun logs``).

A run's output is whatever its command printed, and anyone who can write to the run URL can
put bytes there. A terminal obeys control sequences in what it displays: OSC 0/2 set the
window title, OSC 52 writes the clipboard, ``ESC [ 6 n`` makes the terminal *type* an answer
into its input, ``ESC [ 2 J`` clears the screen, ``ESC [ ? 1049 h`` switches to the
alternate screen, and bidi overrides reorder what a line appears to say. So every control
character is shown as a visible escape (``\\x1b``, ``\\x07``, ``\\u202e``) instead of being sent,
except:

* newline and tab, unchanged; a carriage return becomes a newline (``\\r\\n`` stays one
  newline), so a progress bar's redraws read as lines and cannot overwrite earlier text;
* complete SGR colour sequences (``ESC [ 1;31 m``: only digits, ``;`` and ``:``), which only
  colour text; a reset is added at the end if any was passed, so colour never leaks into the
  user's prompt.

Bytes that are not UTF-8 become U+FFFD (a raw 0x9b would be an 8-bit CSI to some terminals).
The filter is incremental: a sequence or character split across chunks is handled whole.
"""

from __future__ import annotations

import codecs
import re

__all__ = ["TerminalSanitizer", "sanitize"]

# A complete SGR sequence, bounded so a flood of parameters is not "colour".
_SGR = re.compile(r"\x1b\[[0-9;:]{0,32}m")
# What may be the start of an SGR sequence at the end of a chunk: held for the next one.
_PARTIAL_SGR = re.compile(r"\x1b(?:\[[0-9;:]{0,32})?\Z")
# C0 controls but tab and newline, DEL, C1 controls, bidi embeddings/overrides/isolates, and
# line/paragraph separators (some terminals break lines on them).
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
_RESET = "\x1b[0m"


def _visible(m: re.Match[str]) -> str:
    c = m.group(0)
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


class TerminalSanitizer:
    """Feed chunks of raw bytes; get back UTF-8 bytes safe to write to a terminal."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # a possible SGR prefix from the end of the last chunk
        self._coloured = False
        self._after_cr = False  # the last character written was a CR turned newline

    def feed(self, data: bytes) -> bytes:
        text = self._pending + self._decoder.decode(data)
        m = _PARTIAL_SGR.search(text)
        if m and len(text) - m.start() <= 36:
            text, self._pending = text[: m.start()], text[m.start():]
        else:
            self._pending = ""
        return self._clean(text).encode("utf-8")

    def close(self) -> bytes:
        """What is still held (a cut-off sequence, shown escaped), and a colour reset."""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        out = self._clean(text)
        if self._coloured:
            out += _RESET
            self._coloured = False
        return out.encode("utf-8")

    def _clean(self, text: str) -> str:
        if not text:
            return ""
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the \n of a \r\n split across chunks: already written
        self._after_cr = text.endswith("\r")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        parts = []
        pos = 0
        for m in _SGR.finditer(text):
            parts.append(_UNSAFE.sub(_visible, text[pos:m.start()]))
            parts.append(m.group(0))
            self._coloured = True
            pos = m.end()
        parts.append(_UNSAFE.sub(_visible, text[pos:]))
        return "".join(parts)


def sanitize(data: bytes) -> bytes:
    """``data`` made safe in one go (see :class:`TerminalSanitizer`)."""
    s = TerminalSanitizer()
    return s.feed(data) + s.close()
