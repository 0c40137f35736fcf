"""Reads TensorBoard event files back with TensorBoard itself (independent of our encoder):
its event-file loader and protos, and the scalars its EventAccumulator shows."""
from tensorboard.backend.event_processing import event_accumulator, event_file_loader


def events(path) -> list:
    """The tensorflow.Event protos of one events file, as TensorBoard reads them."""
    return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def tensorboard_view(events_dir, first_start_counts: bool = False) -> list:
    """[(step, tag, value)] sorted, as TensorBoard shows them (a step twice when it is there
    twice). False: what the installed TensorBoard's EventAccumulator keeps (it ignores a run's
    first SessionLog.START and, at a later START of step S, purges the points of steps >= S).
    True: as older ones keep them, which purged at every START: a replay of the events."""
    if not first_start_counts:
        acc = event_accumulator.EventAccumulator(
            str(events_dir), size_guidance={event_accumulator.SCALARS: 0},
            purge_orphaned_data=True)
        acc.Reload()
        return sorted((s.step, tag, s.value) for tag in acc.Tags()["scalars"]
                      for s in acc.Scalars(tag))
    kept = []
    for path in sorted(events_dir.iterdir()):
        for e in events(path):
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                kept = [(step, tag, v) for step, tag, v in kept if step < e.step]
            kept += [(e.step, v.tag, v.simple_value) for v in e.summary.value]
    return sorted(kept)
