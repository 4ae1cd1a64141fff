"""The personalization score: colour signatures that tell demo users apart, safe model loading,
and (slow) the demo users trained for real whose fine-tuned models draw their own toys."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers.workshop.basemodel import drawing
from helpers.workshop.demo_subjects import DEMO_SUBJECTS, subject_images
from helpers.workshop.personalization import (
    PALETTE,
    color_signature,
    format_table,
    loss_curve,
    personalization_table,
    set_distance,
    set_signature,
    smooth,
)

USERS = [subject.user_id for subject in DEMO_SUBJECTS]


def photos(seed: int, count: int = 5) -> dict[str, list[Image.Image]]:
    return {subject.user_id: subject_images(subject, count, seed) for subject in DEMO_SUBJECTS}


def plain(color: tuple[int, int, int], background=(246, 246, 246)) -> Image.Image:
    image = Image.new("RGB", (64, 64), background)
    image.paste(color, (16, 16, 48, 48))
    return image


def test_a_signature_counts_object_pixels_by_nearest_palette_colour():
    names = list(PALETTE)
    for name, rgb in drawing.COLORS.items():
        slightly_off = tuple(min(255, max(0, c + 12)) for c in rgb)
        signature = color_signature(plain(slightly_off))
        assert signature.argmax() == names.index(name)
        assert signature.sum() == pytest.approx(1.0)
    # dark pixels are black; the pale backgrounds count for nothing
    assert color_signature(plain((10, 10, 10)))[names.index("black")] == pytest.approx(1.0)
    for background in drawing.BACKGROUNDS:
        assert not color_signature(Image.new("RGB", (64, 64), background)).any()


def test_each_subjects_photos_are_closest_to_its_own_other_photos():
    first, second = photos(seed=0), photos(seed=1)
    for user in USERS:
        own = set_distance(second[user], first[user])
        others = [set_distance(second[user], first[other]) for other in USERS if other != user]
        assert own < 0.2
        assert min(others) > 1.0 > own
    signature = set_signature(first["demo-ada"])
    names = list(PALETTE)
    assert {names[i] for i in np.argsort(signature)[-2:]} == {"purple", "yellow"}


def test_the_table_marks_a_model_that_draws_its_users_toy():
    instance, tuned = photos(seed=0), photos(seed=2, count=4)
    # a "base model" that draws a plain blue toy for everyone
    base_toy = [
        drawing.draw(drawing.random_scene(np.random.default_rng(i), "toy", "blue"))
        for i in range(4)
    ]
    rows = personalization_table(instance, {user: base_toy for user in USERS}, tuned)
    assert [row.user_id for row in rows] == USERS
    for row in rows:
        assert row.closer_to_own_than_others and row.personalized
        assert row.tuned_to_own < row.tuned_to_others
    by_user = {row.user_id: row for row in rows}
    assert by_user["demo-ada"].closer_than_base and by_user["demo-bo"].closer_than_base
    # Bo's bowtie is blue: the blue base toy is closer to Bo's photos than to Ada's
    assert by_user["demo-bo"].base_to_own < by_user["demo-ada"].base_to_own

    # a model that draws Bo's toy for Ada is caught
    swapped = dict(tuned, **{"demo-ada": tuned["demo-bo"]})
    ada = personalization_table(instance, {u: base_toy for u in USERS}, swapped)[0]
    assert not ada.closer_to_own_than_others and ada.closest_other == "demo-bo"

    table = format_table(rows)
    assert table.count("\n") == 1 + len(USERS) and "demo-bo" in table and "**no**" not in table


def test_the_table_needs_two_users_and_every_users_pictures():
    instance = photos(seed=0, count=3)
    with pytest.raises(ValueError, match="two users"):
        personalization_table({"demo-ada": instance["demo-ada"]}, instance, instance)
    with pytest.raises(ValueError, match="demo-bo"):
        personalization_table(
            instance, {u: v for u, v in instance.items() if u != "demo-bo"}, instance
        )


def test_loss_curve_plots_one_smoothed_line_per_user():
    import matplotlib

    matplotlib.use("Agg")
    assert smooth([1.0, 3.0, 5.0], window=2).tolist() == [1.0, 2.0, 4.0]
    summaries = {user: {"loss_history": list(np.linspace(0.5, 0.1, 50))} for user in USERS}
    figure = loss_curve(summaries)
    axis = figure.axes[0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == USERS
    assert len(axis.lines) == 2 * len(USERS)


# --- slow: real training of the demo users ------ -----------------------------------------


def test_read_summary_reads_a_model_archive_a_folder_and_bytes(tmp_path):
    import json

    from helpers.domain.archives import write_tar_gz
    from helpers.workshop.personalization import read_summary

    summary = {"loss_history": [0.5, 0.25], "steps": 2}
    text = json.dumps(summary)
    archive = write_tar_gz(
        tmp_path / "model.tar.gz",
        {"pytorch_lora_weights.safetensors": b"0" * 64, "training_summary.json": text},
    )
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "training_summary.json").write_text(text)
    assert read_summary(archive) == read_summary(tmp_path / "folder") == summary
    assert read_summary(text.encode()) == summary


def test_read_summary_refuses_an_oversized_member_or_too_many_members(tmp_path, monkeypatch):
    from helpers.domain.archives import write_tar_gz
    from helpers.workshop import personalization
    from helpers.workshop.personalization import MAX_SUMMARY_BYTES, read_summary

    huge = b'{"pad": "' + b" " * MAX_SUMMARY_BYTES + b'"}'  # a valid JSON, just too large
    archive = write_tar_gz(tmp_path / "huge.tar.gz", {"out/training_summary.json": huge})
    with pytest.raises(ValueError, match=f"'out/training_summary.json' in .*{len(huge)} bytes"):
        read_summary(archive)
    (tmp_path / "training_summary.json").write_bytes(huge)
    for source in (tmp_path, huge):
        with pytest.raises(ValueError, match=f"{len(huge)} bytes, at most {MAX_SUMMARY_BYTES}"):
            read_summary(source)
    small = write_tar_gz(tmp_path / "small.tar.gz", {"training_summary.json": '{"a": 1}'})
    with pytest.raises(ValueError, match="8 bytes, at most 4"):
        read_summary(small, max_bytes=4)

    monkeypatch.setattr(personalization, "MAX_MEMBERS", 3)
    files = {f"junk-{i}.txt": "x" for i in range(4)} | {"training_summary.json": "{}"}
    crowded = write_tar_gz(tmp_path / "crowded.tar.gz", files)
    with pytest.raises(ValueError, match="more than 3 members"):
        read_summary(crowded)


@pytest.mark.slow
def test_every_demo_user_gets_a_model_that_draws_their_own_toy(tmp_path):
    """The whole of Phase A on the real base model: validated uploads, one local job per demo
    user with notebook 02's recipe, each model.tar.gz reloaded with load_lora_weights.

    Each model draws its user's toy (identity targets) on other seeds than notebook 02's."""
    from helpers import load_settings
    from helpers.backend import open_backend
    from helpers.ports.jobs import JobStatus, TrainingJobRequest
    from helpers.workshop.basemodel.loading import load_base_pipeline
    from helpers.workshop.identity import (
        RECIPE,
        format_identity_table,
        identity_row,
        subject_parts,
    )
    from helpers.workshop.personalization import (
        EVAL_GUIDANCE,
        EVAL_SEEDS,
        generate,
        load_user_pipeline,
        upload_instance_images,
    )

    settings = load_settings(backend="local", work_dir=str(tmp_path))
    backend = open_backend(settings)
    provisioned = backend.provision()
    prompt, class_prompt = DEMO_SUBJECTS[0].instance_prompt, DEMO_SUBJECTS[0].class_prompt
    other_seeds = [seed + 100 for seed in EVAL_SEEDS]
    # before the jobs start: torch in this process beside a job's threads slows both ~30x
    base_pipe = load_base_pipeline(settings.base_model)
    base = generate(base_pipe, prompt, EVAL_SEEDS, guidance=EVAL_GUIDANCE)
    base_other = generate(base_pipe, prompt, other_seeds, guidance=EVAL_GUIDANCE)
    base_class = generate(base_pipe, class_prompt, other_seeds, guidance=EVAL_GUIDANCE)
    del base_pipe
    jobs = backend.jobs
    instance = photos(seed=0)
    for user in USERS:
        uri = settings.uri(f"users/{user}/instance/")
        upload_instance_images(provisioned.store, uri, instance[user])
        jobs.submit(
            TrainingJobRequest(
                job_name=f"{user}-e2e",
                user_id=user,
                model_id="e2e",
                instance_data_uri=uri,
                base_model=settings.base_model,
                output_path=settings.uri("jobs/"),
                hyperparameters={**RECIPE, "num_validation_images": 0},
            )
        )
    finished = {user: jobs.wait(f"{user}-e2e", user, timeout=900, poll=0.5) for user in USERS}
    jobs.close()
    tuned, identity = {}, []
    for user, done in finished.items():
        assert done.status == JobStatus.COMPLETED, done.failure_reason
        tar = tmp_path / f"{user}.tar.gz"
        provisioned.store.get_file(done.output_uri, tar)
        pipe = load_user_pipeline(settings.base_model, tar)
        tuned[user] = generate(pipe, prompt, EVAL_SEEDS, guidance=EVAL_GUIDANCE)
        parts = subject_parts(next(s for s in DEMO_SUBJECTS if s.user_id == user))
        tuned_other = generate(pipe, prompt, other_seeds, guidance=EVAL_GUIDANCE)
        tuned_class = generate(pipe, class_prompt, other_seeds, guidance=EVAL_GUIDANCE)
        identity.append(identity_row(user, parts, base_other, tuned_other, base_class, tuned_class))

    rows = personalization_table(instance, dict.fromkeys(USERS, base), tuned)
    assert all(row.personalized for row in rows), format_table(rows)
    table = format_identity_table(identity, seeds=len(other_seeds))
    print(table)
    assert all(row.meets_targets for row in identity), table


def test_waiting_for_onboarding_stops_when_a_model_fails_before_its_job_starts(tmp_path):
    """A model that fails before its training job is submitted (no execution role, say) is
    reported at once, not waited for until the timeout."""
    import time

    from helpers.domain.records import ModelRecord, ModelStatus, UserRecord
    from helpers.infra.local.metadata import SqliteMetadataStore
    from helpers.ports.metadata import NotFound
    from helpers.workshop.personalization import onboard_with_progress

    metadata = SqliteMetadataStore(tmp_path / "metadata.sqlite")
    metadata.create_table()
    metadata.put_user(UserRecord("ada"))
    model = ModelRecord(
        "ada",
        "m1",
        instance_data_uri="s3://bucket/users/ada/training/m1/",
        training_job_name="ada-m1-0123abcd",
    )
    metadata.create_model(model)

    class FailingOnboarding:
        def start(self, record):  # as the driver records a submission that raised
            metadata.update_model(
                "ada",
                "m1",
                expected_version=1,
                status=ModelStatus.FAILED.value,
                failure_reason="onboarding failed (ref 0123456789ab)",
            )

        def wait(self, timeout=None):
            return None

    class NoJobs:
        def describe(self, job_name, user_id):
            raise NotFound(job_name)

    started = time.monotonic()
    [(user, (done, record))] = onboard_with_progress(
        FailingOnboarding(), NoJobs(), metadata, [model], timeout=20
    ).items()
    assert time.monotonic() - started < 10
    assert (user, done, record.status) == ("ada", None, ModelStatus.FAILED)
