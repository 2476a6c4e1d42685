"""The update-throughput benchmark's arithmetic bound counts the FLOPs of one SAC update correctly."""

from experiments.bench_updates import ACT_DIM, BATCH, OBS_DIM, update_flops


def test_update_flop_count_matches_hand_count_of_dense_products():
    critic_macs = (OBS_DIM + ACT_DIM) * 256 + 256 * 256 + 256  # one member, per sample
    actor_macs = OBS_DIM * 256 + 256 * 256 + 256 * 2 * ACT_DIM
    per_sample = (
        actor_macs + 2 * critic_macs  # target: next actions, two target critics
        + 2 * critic_macs * 3  # critic loss: forward, input and weight gradients
        + actor_macs * 3  # actor loss: actor forward and backward
        + 2 * critic_macs * 2  # critics forward and backward to the actions
    )
    hand_count = 2 * per_sample * BATCH
    assert abs(update_flops() / hand_count - 1) < 0.05
