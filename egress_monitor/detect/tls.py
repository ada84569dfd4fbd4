"""The server name a TLS client asks for, from its ClientHello (pure).

Bounded and strict: anything that is not a well-formed ClientHello record gives None.
"""

from __future__ import annotations

import struct


def client_hello_sni(payload: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello at the start of ``payload``."""
    try:
        if len(payload) < 9 or payload[0] != 0x16 or payload[1] != 0x03 or payload[5] != 0x01:
            return None
        offset = 9 + 2 + 32  # record header, handshake header, client version, random
        offset += 1 + payload[offset]  # session id
        (suites,) = struct.unpack_from("!H", payload, offset)
        offset += 2 + suites
        offset += 1 + payload[offset]  # compression methods
        (ext_total,) = struct.unpack_from("!H", payload, offset)
        offset += 2
        end = min(len(payload), offset + ext_total)
        while offset + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", payload, offset)
            offset += 4
            if ext_type == 0:  # server_name
                _list_len, name_type, name_len = struct.unpack_from("!HBH", payload, offset)
                if name_type != 0:
                    return None
                name = payload[offset + 5:offset + 5 + name_len]
                if len(name) != name_len:
                    return None
                return name.decode("ascii").lower().rstrip(".")
            offset += ext_len
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    return None
