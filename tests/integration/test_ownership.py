"""A job owns its keys (storage/ownership.py, cluster/services.py): against a real redis-server, no Ray.

Two runs with the same job id on one Redis: the second is refused while the first holds the job,
takes it over once the first one's lease has run out, and never deletes keys it does not own.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polydistill.cluster.cli import main
from polydistill.cluster.config import load_config
from polydistill.cluster.resume import save_job_config
from polydistill.cluster.services import job_redis
from polydistill.storage.keys import JobKeys
from polydistill.storage.ownership import NOBODY, JobInUse, JobOwnership, OwnershipLost, delete_job_keys

pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def fill(client, keys: JobKeys) -> None:
    client.xadd(keys.work_stream, {b"m": b"batch"})
    client.hset(keys.control, "run", "1")


def test_a_second_claim_is_refused_naming_the_job_and_what_to_change(redis_client):
    keys = JobKeys("shared-name")
    first = JobOwnership.claim(redis_client, keys)
    with pytest.raises(JobInUse) as refused:
        JobOwnership.claim(redis_client, keys)
    message = str(refused.value)
    assert "job 'shared-name' is in use by another run" in message and "set job_id" in message
    assert "another output folder" in message and first.token in message and "lease ends in" in message


def test_a_lapsed_lease_is_taken_over_and_the_old_run_deletes_nothing(redis_client):
    keys = JobKeys("crashed")
    crashed = JobOwnership.claim(redis_client, keys, lease_s=0.2)
    fill(redis_client, keys)
    time.sleep(0.3)  # the crashed run renews nothing: its lease runs out
    successor = JobOwnership.claim(redis_client, keys)
    fill(redis_client, keys)
    with pytest.raises(OwnershipLost):
        crashed.delete_job_keys()
    crashed.end()  # logs, deletes nothing, releases nothing
    assert redis_client.xlen(keys.work_stream) == 2
    assert redis_client.get(keys.owner).decode() == successor.token
    assert successor.delete_job_keys() == 2
    assert redis_client.keys(keys.pattern) == [keys.owner.encode()]  # the owner key stays until the end
    successor.end()
    assert redis_client.keys(keys.pattern) == []


def test_a_run_whose_owner_key_redis_lost_still_removes_its_keys(redis_client):
    keys = JobKeys("restarted")
    owner = JobOwnership.claim(redis_client, keys)
    redis_client.flushdb()  # Redis came back without its data; the driver recreated the streams
    fill(redis_client, keys)
    assert owner.delete_job_keys() == 2
    assert redis_client.get(keys.owner).decode() == owner.token  # held again until the run gives it up
    owner.end()
    assert redis_client.keys(keys.pattern) == []


def test_without_a_token_only_keys_nobody_owns_are_deleted(redis_client):
    keys = JobKeys("leftovers")
    fill(redis_client, keys)
    assert delete_job_keys(redis_client, keys, NOBODY) == 2
    fill(redis_client, keys)
    owner = JobOwnership.claim(redis_client, keys)
    with pytest.raises(OwnershipLost):
        delete_job_keys(redis_client, keys)
    assert redis_client.xlen(keys.work_stream) == 1
    owner.end()


def test_the_lease_is_renewed_while_the_job_runs_and_taken_again_after_redis_lost_it(redis_client):
    keys = JobKeys("long-job")
    owner = JobOwnership.claim(redis_client, keys, lease_s=0.3)
    with owner.renewed(every_s=0.05):
        time.sleep(0.6)  # twice the lease
        assert redis_client.get(keys.owner).decode() == owner.token
        redis_client.flushdb()  # Redis restarted without its data
        time.sleep(0.2)
        assert redis_client.get(keys.owner).decode() == owner.token
    owner.end()
    assert redis_client.get(keys.owner) is None


def config_on(redis_server, tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"transport.redis_url={redis_server.url}", *overrides], str(tmp_path / "shared"))


def test_a_run_ending_in_an_error_removes_its_keys_and_gives_the_job_up(redis_server, redis_client, tmp_path):
    config = config_on(redis_server, tmp_path)
    keys = JobKeys(config.resolved_job_id)
    with pytest.raises(RuntimeError, match="model building failed"):
        with job_redis(config) as held:
            fill(redis_client, keys)
            assert redis_client.get(keys.owner).decode() == held.ownership.token
            raise RuntimeError("model building failed")
    assert redis_client.keys(keys.pattern) == []


def test_a_second_run_with_the_same_job_id_exits_2_and_leaves_the_first_ones_keys(redis_server, redis_client,
                                                                                 tmp_path, capsys):
    """Two output folders with the same name: the default job id collides."""
    config = config_on(redis_server, tmp_path)
    keys = JobKeys(config.resolved_job_id)
    with job_redis(config):
        fill(redis_client, keys)
        started = time.monotonic()
        status = main(["run", str(TINY), "--output", str(tmp_path / "elsewhere" / "shared"), "--no-progress",
                       "--set", f"transport.redis_url={redis_server.url}"])
        took = time.monotonic() - started
        assert redis_client.xlen(keys.work_stream) == 1  # the first run's batch is still there
    assert status == 2 and took < 10
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: job 'shared' is in use by another run") and "set job_id" in line
    assert not (tmp_path / "elsewhere").exists()  # refused before anything was built or written


def test_resume_takes_the_job_anew(redis_server, redis_client, tmp_path, capsys):
    config = config_on(redis_server, tmp_path)
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    save_job_config(config, out)
    with job_redis(config):  # another run holds the job: resume is refused like any run
        assert main(["resume", str(out), "--no-progress"]) == 2
    assert "job 'shared' is in use by another run" in capsys.readouterr().err
