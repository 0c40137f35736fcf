"""Reads TensorBoard event files back with TensorBoard itself (independent of our encoder):
its event-file loader, and the scalars its event accumulators keep."""
from tensorboard.backend.event_processing import (event_accumulator, event_file_loader,
                                                  plugin_event_accumulator)
from tensorboard.util import tensor_util


def events(path) -> list:
    """The tensorflow.Event protos of one events file, as TensorBoard reads them."""
    return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def tensorboard_view(events_dir, first_start_counts: bool = False) -> list:
    """[(step, tag, value)] sorted, as TensorBoard shows them (a step twice when it is there
    twice). False: the rule of the accumulator TensorBoard's server reads with
    (`plugin_event_accumulator`: a run's first SessionLog.START is ignored; at a later one, of
    step S, the points of steps >= S are purged). True: the older rule of its legacy
    `event_accumulator`, which purges at every START."""
    if first_start_counts:
        acc = event_accumulator.EventAccumulator(
            str(events_dir), size_guidance={event_accumulator.SCALARS: 0},
            purge_orphaned_data=True)
        acc.Reload()
        return sorted((s.step, tag, s.value) for tag in acc.Tags()["scalars"]
                      for s in acc.Scalars(tag))
    acc = plugin_event_accumulator.EventAccumulator(
        str(events_dir), size_guidance={plugin_event_accumulator.TENSORS: 0},
        purge_orphaned_data=True)
    acc.Reload()
    return sorted((t.step, tag, float(tensor_util.make_ndarray(t.tensor_proto)))
                  for tag in acc.Tags()["tensors"] for t in acc.Tensors(tag))
