"""UnifiedVocab: disjoint ranges, modality of every id, documents, storage round trip, discrete rows as Batch."""

import numpy as np
import pytest
import torch

from megafusion.discrete.batch import discrete_batch
from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT, UnifiedVocab


def test_ranges_are_disjoint_and_cover_the_vocabulary():
    v = UnifiedVocab(100, 16, 8, ("text", "image_text", "audio_text", "speech_to_text"))
    ids = [*range(100), *v.codes_to_ids(IMAGE, range(16)), *v.codes_to_ids(AUDIO, range(8))]
    ids += [v.special(m, k) for m in (TEXT, IMAGE, AUDIO) for k in ("bos", "eos", "mask", "pad")]
    ids += [v.task(t) for t in v.tasks]
    assert sorted(ids) == list(range(v.size)) and v.size == 100 + 16 + 8 + 12 + 4
    modality = v.modality_of(np.arange(v.size))
    assert (modality[:100] == TEXT).all() and (modality[100:116] == IMAGE).all() and (modality[116:124] == AUDIO).all()
    assert [v.modality_of(v.mask(m)) for m in (TEXT, IMAGE, AUDIO)] == [TEXT, IMAGE, AUDIO]
    assert v.modality_of(v.task("speech_to_text")) == TEXT
    assert torch.equal(v.modality_of(torch.arange(v.size)), torch.from_numpy(modality))
    assert (v.ids_to_codes(AUDIO, v.codes_to_ids(AUDIO, [0, 7])) == [0, 7]).all()
    with pytest.raises(ValueError, match="image codes must lie in"):
        v.codes_to_ids(IMAGE, [16])
    with pytest.raises(ValueError, match="not audio content ids"):
        v.ids_to_codes(AUDIO, [5])
    with pytest.raises(KeyError, match="not in this vocabulary"):
        v.task("video")


def test_document_layout_and_storage():
    v = UnifiedVocab(50, 10, 0)
    doc = v.document("image_text", [(TEXT, [3, 4]), (IMAGE, v.codes_to_ids(IMAGE, [1, 2, 3]))])
    assert doc.tolist() == [v.task("image_text"), v.bos(TEXT), 3, 4, v.eos(TEXT), v.bos(IMAGE), 51, 52, 53,
                            v.eos(IMAGE)]
    assert not v.is_text_only(doc) and v.is_text_only(v.document("text", [(TEXT, [1])]))
    assert UnifiedVocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="does not match"):
        UnifiedVocab.from_dict({**v.to_dict(), "size": 3}, where="manifest.json vocabulary")


def test_discrete_rows_are_bidirectional_document_blocks():
    v = UnifiedVocab(50, 10, 0)
    a, b = v.document("text", [(TEXT, [1, 2])]), v.document("text", [(TEXT, [7])])
    batch = discrete_batch([[a, b], [v.document("image_text", [(TEXT, [5]), (IMAGE, [50, 51])])]], 12, v).validate()
    assert batch.block_ids[0].tolist() == [0] * 5 + [1] * 4 + [-1] * 3
    assert batch.context_start[0, :9].tolist() == [0] * 5 + [5] * 4
    assert batch.token_modality[1].tolist() == [0] * 4 + [1] * 4 + [-1] * 4
    from megafusion.model.attention.layout import AttentionLayout

    mask = AttentionLayout.from_batch(batch).dense_mask()[0, 0]
    assert mask[0, 4] and mask[4, 0] and not mask[0, 5] and not mask[5, 4]  # bidirectional, documents isolated
    with pytest.raises(ValueError, match="more than data.seq_length=4"):
        discrete_batch([[a]], 4, v)
    with pytest.raises(ValueError, match="unified"):
        discrete_batch([[np.array([v.size])]], 4, v)
