"""A gRPC client of Envoy's RLS API for the tests (grpcio, with hand-encoded protobuf):
to check rls-server on its own, and to read what it counted for a descriptor.

    client = RlsClient(port)
    answer = client(descriptor(("key_id", "k_1"), ("window", "day"), limit=(100, DAY)), hits=1)
    answer["code"], answer["statuses"][0]["remaining"]
"""
import grpc

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
OK, OVER_LIMIT, UNKNOWN = 1, 2, 0
SECOND, MINUTE, HOUR, DAY = 1, 2, 3, 4

# -- protobuf, by hand --------------------------------------------------------------------


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(tag, value):
    if isinstance(value, int):
        return _varint(tag << 3) + _varint(value)
    return _varint(tag << 3 | 2) + _varint(len(value)) + value


def descriptor(*entries, limit=None):
    """entries: (key, value) pairs; limit: (requests_per_unit, unit) override."""
    out = b"".join(_field(1, _field(1, k.encode()) + _field(2, v.encode())) for k, v in entries)
    if limit:
        out += _field(2, _field(1, limit[0]) + _field(2, limit[1]))
    return out


def request(domain, *descriptors, hits=0):
    out = _field(1, domain.encode()) + b"".join(_field(2, d) for d in descriptors)
    return out + (_field(3, hits) if hits else b"")


def _fields(buf):
    """{tag: [int | bytes]} of one message."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        out.setdefault(tag, []).append(value)
    return out


def _read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if not b & 0x80:
            return n, i


def _one(fields, tag, default=0):
    return fields.get(tag, [default])[-1]


def decode_response(buf):
    """{"code", "statuses": [{"code", "limit": (name, per_unit, unit) | None, "remaining", "reset_s"}]}"""
    top, statuses = _fields(buf), []
    for raw in top.get(2, []):
        s = _fields(raw)
        limit = None
        if 2 in s:
            lim = _fields(_one(s, 2))
            limit = (_one(lim, 3, b"").decode(), _one(lim, 1), _one(lim, 2))
        reset = _fields(_one(s, 4)).get(1, [0])[-1] if 4 in s else None
        statuses.append({"code": _one(s, 1), "limit": limit, "remaining": _one(s, 3), "reset_s": reset})
    return {"code": _one(top, 1), "statuses": statuses}


class RlsClient:
    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.raw = self.channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def __call__(self, *descriptors, domain="apikey", hits=0, timeout=5):
        return decode_response(self.raw(request(domain, *descriptors, hits=hits), timeout=timeout))

    def close(self):
        self.channel.close()
