"""Reads TensorBoard event files back with protobuf's own descriptors (independent of our
encoder) and replays them as TensorBoard's EventAccumulator keeps scalars."""
import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from t5x_lite.training import metrics_writer as mw


def event_class():
    """tensorflow.Event's fields we write, declared with protobuf's own descriptors."""
    f = descriptor_pb2.FileDescriptorProto(name="t5x_lite_test_event.proto", package="tft")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for fname, num, typ, label, type_name in fields:
            fld = m.field.add(name=fname, number=num, type=typ, label=label)
            if type_name:
                fld.type_name = type_name
    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Value", [("tag", 1, T.TYPE_STRING, opt, None), ("simple_value", 2, T.TYPE_FLOAT, opt, None)])
    msg("Summary", [("value", 1, T.TYPE_MESSAGE, rep, ".tft.Value")])
    msg("SessionLog", [("status", 1, T.TYPE_INT32, opt, None)])
    msg("Event", [("wall_time", 1, T.TYPE_DOUBLE, opt, None), ("step", 2, T.TYPE_INT64, opt, None),
                  ("file_version", 3, T.TYPE_STRING, opt, None),
                  ("summary", 5, T.TYPE_MESSAGE, opt, ".tft.Summary"),
                  ("session_log", 6, T.TYPE_MESSAGE, opt, ".tft.SessionLog")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Event"))


def records(path):
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == mw._masked_crc(data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == mw._masked_crc(payload)
        out.append(payload)
        pos += 16 + n
    return out


def tensorboard_view(events_dir, first_start_counts: bool = False) -> list:
    """[(step, tag, value)] sorted, as TensorBoard keeps them (a step twice when it is there twice): files in name order; at a SessionLog.START
    of step S only the points of step < S stay (its `_Purge`). The current EventAccumulator
    ignores a run's first START (`first_start_counts=False`); older ones purge at every one."""
    Event = event_class()
    kept, seen_start = [], False
    for path in sorted(events_dir.iterdir()):
        for e in map(Event.FromString, records(path)):
            if e.session_log.status == 1:
                if seen_start or first_start_counts:
                    kept = [(step, tag, v) for step, tag, v in kept if step < e.step]
                seen_start = True
            kept += [(e.step, v.tag, v.simple_value) for v in e.summary.value]
    return sorted(kept)
