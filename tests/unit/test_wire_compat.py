"""Messages written by an earlier build still decode: payloads encoded by wire schema version 1, kept as bytes.

Each payload below was produced by ``encode`` of the message its builder returns, before the schema was
declared field by field; a reader must keep turning those exact bytes into the same message, and today's
encoder must write the same map (keys, dtypes, shapes and raw bytes; msgpack maps carry no meaningful order).
"""

import base64

import msgpack
import numpy as np
import pytest

from polydistill.storage.wire import SCHEMA_VERSION, Knowledge, SoftLabels, TeacherVote, WorkBatch, decode, encode


def every_work_field() -> WorkBatch:
    return WorkBatch(
        job_id="job-7", epoch=1, batch_id=4, sample_ids=np.array([10, 11]), languages=("eng_Latn", "swh_Latn"),
        input_ids=np.array([[5, 6, 7], [8, 9, 0]]), attention_mask=np.array([[1, 1, 1], [1, 1, 0]]),
        labels=np.array([1, 0]), pair_input_ids=np.array([[3, 4], [5, 0]]),
        pair_attention_mask=np.array([[1, 1], [1, 0]]), token_labels=np.array([[-100, 2, -100], [1, -100, -100]]),
        student_input_ids=np.array([[1, 2, 3, 4], [5, 6, 0, 0]]),
        student_attention_mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]]), task="nli",
    )


def every_knowledge_field() -> Knowledge:
    ramp = np.arange(24, dtype=np.float32) / 8
    return Knowledge(
        work=every_work_field(), teacher_id="teacher-1",
        soft=SoftLabels(topk_values=ramp[:8].reshape(2, 2, 2)[..., ::-1].copy(),
                        topk_indices=np.array([[[3, 1], [0, 2]], [[1, 0], [2, 3]]], np.int32),
                        topk_logsumexp=ramp[:4].reshape(2, 2) + 1),
        hidden_states={3: ramp[:12].reshape(2, 3, 2).astype(np.float16)},
        attentions={0: ramp[:18].reshape(2, 1, 3, 3).astype(np.float16)},
        embeddings=ramp[:4].reshape(2, 2), teacher_seconds=0.5,
        ensemble=(TeacherVote("teacher", ramp[:4].reshape(2, 2), np.array([1, 1], np.uint8)),
                  TeacherVote("africa", ramp[4:8].reshape(2, 2), np.array([0, 1], np.uint8))),
        target_ids=np.array([[7, -100], [8, 9]], np.int32),
    )


def full_logits_knowledge() -> Knowledge:
    work = WorkBatch(job_id="job-7", epoch=0, batch_id=0, sample_ids=np.array([3]), languages=("fra_Latn",),
                     input_ids=np.array([[4, 5]]), attention_mask=np.array([[1, 1]]))
    return Knowledge(work=work, teacher_id="teacher-0",
                     soft=SoftLabels.full(np.array([[0.5, -1.0, 2.0]], np.float16)))


EVERY_WORK_FIELD_V1 = (
    "3gAQoXYBpGtpbmSkd29ya6Zqb2JfaWSlam9iLTelZXBvY2gBqGJhdGNoX2lkBKpzYW1wbGVfaWRzg6VkdHlwZaVpbnQ2NKVzaGFwZZEC"
    "o3Jhd8QQCgAAAAAAAAALAAAAAAAAAKlsYW5ndWFnZXOSqGVuZ19MYXRuqHN3aF9MYXRuqWlucHV0X2lkc4OlZHR5cGWlaW50MzKlc2hh"
    "cGWSAgOjcmF3xBgFAAAABgAAAAcAAAAIAAAACQAAAAAAAACuYXR0ZW50aW9uX21hc2uDpWR0eXBlpXVpbnQ4pXNoYXBlkgIDo3Jhd8QG"
    "AQEBAQEApmxhYmVsc4OlZHR5cGWlaW50NjSlc2hhcGWRAqNyYXfEEAEAAAAAAAAAAAAAAAAAAACucGFpcl9pbnB1dF9pZHODpWR0eXBl"
    "pWludDMypXNoYXBlkgICo3Jhd8QQAwAAAAQAAAAFAAAAAAAAALNwYWlyX2F0dGVudGlvbl9tYXNrg6VkdHlwZaV1aW50OKVzaGFwZZIC"
    "AqNyYXfEBAEBAQCsdG9rZW5fbGFiZWxzg6VkdHlwZaVpbnQ2NKVzaGFwZZICA6NyYXfEMJz/////////AgAAAAAAAACc/////////wEA"
    "AAAAAAAAnP////////+c/////////7FzdHVkZW50X2lucHV0X2lkc4OlZHR5cGWlaW50MzKlc2hhcGWSAgSjcmF3xCABAAAAAgAAAAMA"
    "AAAEAAAABQAAAAYAAAAAAAAAAAAAALZzdHVkZW50X2F0dGVudGlvbl9tYXNrg6VkdHlwZaV1aW50OKVzaGFwZZICBKNyYXfECAEBAQEB"
    "AQAApHRhc2ujbmxp"
)
EVERY_KNOWLEDGE_FIELD_V1 = (
    "i6F2AaRraW5kqWtub3dsZWRnZaR3b3JrjqZqb2JfaWSlam9iLTelZXBvY2gBqGJhdGNoX2lkBKpzYW1wbGVfaWRzg6VkdHlwZaVpbnQ2"
    "NKVzaGFwZZECo3Jhd8QQCgAAAAAAAAALAAAAAAAAAKlsYW5ndWFnZXOSqGVuZ19MYXRuqHN3aF9MYXRuqWlucHV0X2lkc4OlZHR5cGWl"
    "aW50MzKlc2hhcGWSAgOjcmF3xBgFAAAABgAAAAcAAAAIAAAACQAAAAAAAACuYXR0ZW50aW9uX21hc2uDpWR0eXBlpXVpbnQ4pXNoYXBl"
    "kgIDo3Jhd8QGAQEBAQEApmxhYmVsc4OlZHR5cGWlaW50NjSlc2hhcGWRAqNyYXfEEAEAAAAAAAAAAAAAAAAAAACucGFpcl9pbnB1dF9p"
    "ZHODpWR0eXBlpWludDMypXNoYXBlkgICo3Jhd8QQAwAAAAQAAAAFAAAAAAAAALNwYWlyX2F0dGVudGlvbl9tYXNrg6VkdHlwZaV1aW50"
    "OKVzaGFwZZICAqNyYXfEBAEBAQCsdG9rZW5fbGFiZWxzg6VkdHlwZaVpbnQ2NKVzaGFwZZICA6NyYXfEMJz/////////AgAAAAAAAACc"
    "/////////wEAAAAAAAAAnP////////+c/////////7FzdHVkZW50X2lucHV0X2lkc4OlZHR5cGWlaW50MzKlc2hhcGWSAgSjcmF3xCAB"
    "AAAAAgAAAAMAAAAEAAAABQAAAAYAAAAAAAAAAAAAALZzdHVkZW50X2F0dGVudGlvbl9tYXNrg6VkdHlwZaV1aW50OKVzaGFwZZICBKNy"
    "YXfECAEBAQEBAQAApHRhc2ujbmxpqnRlYWNoZXJfaWSpdGVhY2hlci0xpHNvZnSEpGtpbmSkdG9wa6Z2YWx1ZXODpWR0eXBlp2Zsb2F0"
    "MzKlc2hhcGWTAgICo3Jhd8QgAAAAPgAAAAAAAMA+AACAPgAAID8AAAA/AABgPwAAQD+naW5kaWNlc4OlZHR5cGWlaW50MzKlc2hhcGWT"
    "AgICo3Jhd8QgAwAAAAEAAAAAAAAAAgAAAAEAAAAAAAAAAgAAAAMAAACpbG9nc3VtZXhwg6VkdHlwZadmbG9hdDMypXNoYXBlkgICo3Jh"
    "d8QQAACAPwAAkD8AAKA/AACwP61oaWRkZW5fc3RhdGVzkZIDg6VkdHlwZadmbG9hdDE2pXNoYXBlkwIDAqNyYXfEGAAAADAANAA2ADgA"
    "OQA6ADsAPIA8AD2APaphdHRlbnRpb25zkZIAg6VkdHlwZadmbG9hdDE2pXNoYXBllAIBAwOjcmF3xCQAAAAwADQANgA4ADkAOgA7ADyA"
    "PAA9gD0APoA+AD+APwBAQECqZW1iZWRkaW5nc4OlZHR5cGWnZmxvYXQzMqVzaGFwZZICAqNyYXfEEAAAAAAAAAA+AACAPgAAwD6vdGVh"
    "Y2hlcl9zZWNvbmRzyz/gAAAAAAAAqnRhcmdldF9pZHODpWR0eXBlpWludDMypXNoYXBlkgICo3Jhd8QQBwAAAJz///8IAAAACQAAAKhl"
    "bnNlbWJsZZKDp3RlYWNoZXKndGVhY2hlcqZsb2dpdHODpWR0eXBlp2Zsb2F0MzKlc2hhcGWSAgKjcmF3xBAAAAAAAAAAPgAAgD4AAMA+"
    "pnNlcnZlZIOlZHR5cGWldWludDilc2hhcGWRAqNyYXfEAgEBg6d0ZWFjaGVypmFmcmljYaZsb2dpdHODpWR0eXBlp2Zsb2F0MzKlc2hh"
    "cGWSAgKjcmF3xBAAAAA/AAAgPwAAQD8AAGA/pnNlcnZlZIOlZHR5cGWldWludDilc2hhcGWRAqNyYXfEAgAB"
)
FULL_LOGITS_KNOWLEDGE_V1 = (
    "i6F2AaRraW5kqWtub3dsZWRnZaR3b3JrjqZqb2JfaWSlam9iLTelZXBvY2gAqGJhdGNoX2lkAKpzYW1wbGVfaWRzg6VkdHlwZaVpbnQ2"
    "NKVzaGFwZZEBo3Jhd8QIAwAAAAAAAACpbGFuZ3VhZ2VzkahmcmFfTGF0bqlpbnB1dF9pZHODpWR0eXBlpWludDMypXNoYXBlkgECo3Jh"
    "d8QIBAAAAAUAAACuYXR0ZW50aW9uX21hc2uDpWR0eXBlpXVpbnQ4pXNoYXBlkgECo3Jhd8QCAQGmbGFiZWxzwK5wYWlyX2lucHV0X2lk"
    "c8CzcGFpcl9hdHRlbnRpb25fbWFza8CsdG9rZW5fbGFiZWxzwLFzdHVkZW50X2lucHV0X2lkc8C2c3R1ZGVudF9hdHRlbnRpb25fbWFz"
    "a8CkdGFza8CqdGVhY2hlcl9pZKl0ZWFjaGVyLTCkc29mdIKka2luZKRmdWxspmxvZ2l0c4OlZHR5cGWnZmxvYXQxNqVzaGFwZZIBA6Ny"
    "YXfEBgA4ALwAQK1oaWRkZW5fc3RhdGVzkKphdHRlbnRpb25zkKplbWJlZGRpbmdzwK90ZWFjaGVyX3NlY29uZHPLAAAAAAAAAACqdGFy"
    "Z2V0X2lkc8CoZW5zZW1ibGWQ"
)


def unpack(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


@pytest.mark.parametrize(("payload", "build"), [
    (EVERY_WORK_FIELD_V1, every_work_field),
    (EVERY_KNOWLEDGE_FIELD_V1, every_knowledge_field),
    (FULL_LOGITS_KNOWLEDGE_V1, full_logits_knowledge),
])
def test_a_version_1_payload_decodes_to_the_message_it_was_encoded_from(payload, build):
    old = base64.b64decode(payload)
    assert unpack(old)["v"] == 1 <= SCHEMA_VERSION
    decoded = decode(old)
    assert type(decoded) is type(build())
    assert unpack(encode(decoded)) == unpack(old)  # nothing lost or changed on the way in
    assert unpack(encode(build())) == unpack(old)  # and the encoder still writes the same map


def test_the_version_1_payload_holds_every_field_it_claims_to():
    decoded = decode(base64.b64decode(EVERY_KNOWLEDGE_FIELD_V1))
    assert [vote.teacher for vote in decoded.ensemble] == ["teacher", "africa"]
    assert decoded.target_ids.tolist() == [[7, -100], [8, 9]]
    assert decoded.soft.kind == "topk" and decoded.soft.per_token
    assert decoded.work.task == "nli" and decoded.work.student_input_ids.shape == (2, 4)
    assert decoded.work.token_labels.dtype == np.int64 and decoded.work.pair_attention_mask.dtype == np.uint8


def test_fields_added_within_version_1_are_left_off_when_unset_and_travel_when_set():
    plain = unpack(encode(every_work_field()))
    assert "align_targets" not in plain and "align_found" not in plain
    aligned = WorkBatch(**{**vars(every_work_field()), "align_targets": np.ones((2, 3), np.float16),
                           "align_found": np.array([1, 0], np.uint8)})
    back = decode(encode(aligned))
    assert back.align_found.tolist() == [1, 0] and back.align_targets.shape == (2, 3)
