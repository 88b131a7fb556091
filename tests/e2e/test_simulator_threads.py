"""The fleet simulator gives each simulated device one onnxruntime intra-op thread (``SimConfig.inference_threads``).

Hundreds of simulated devices share this host's cores. With the target's two threads, every session (each device's
serving model, each smoke test) keeps a worker thread that spin-waits after every run: measured here, 100 sessions
at 2 predictions a second cost 6 % of a core with two threads and 1 % with one, and in a 300-device rollout a
quarter of a shard's CPU was that spin loop. Real server, real broker, real agents.
"""

from __future__ import annotations

from device_agent.updater.checks import load_device_target
from fleet_server.simulator import Fleet, Receiver, SimConfig


def _fleet(built, tmp_path, server, **kw) -> Fleet:
    return Fleet(SimConfig(root=tmp_path / "devices", server_url=server.url, broker_url=server.broker.url,
                           operator_token=server.token, root_pub=built.keys / "root.pub",
                           fleet_pub=server.data / "keys" / "fleet.pub", devices=2, first_package=built.package,
                           **kw))


def test_simulated_devices_run_their_model_on_one_intra_op_thread(built, tmp_path, make_server):
    receiver = Receiver()
    fleet = _fleet(built, tmp_path, make_server([built.package], receiver.url))
    try:
        fleet.provision()
        fleet.start()
        for d in fleet.devices:
            assert load_device_target(d.directory / "target.toml").threads == 1
            session = d.runner.agent.model.runtime.session
            assert session.get_session_options().intra_op_num_threads == 1
            assert d.runner.agent.model.version == "1.0.0"  # the device still serves after the change
    finally:
        fleet.stop()
        receiver.close()


def test_the_targets_threads_are_kept_when_asked(built, tmp_path, make_server):
    receiver = Receiver()
    fleet = _fleet(built, tmp_path, make_server([built.package], receiver.url), inference_threads=None)
    try:
        fleet.provision()
        for d in fleet.devices:
            assert load_device_target(d.directory / "target.toml").threads == 2  # x86_64-avx2's own
    finally:
        fleet.stop()
        receiver.close()
