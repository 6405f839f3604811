"""Research-Factory (``klong-factory``): research papers -> PaperBench task folders -> teacher SFT data.

Dataflow (one directory per paper under ``<output_dir>/papers/<paper_id>/``, one marker per finished stage)::

    collect   local PDFs / arXiv LaTeX archives / Markdown (+ arXiv ids or a listing)  -> paper.md, meta.json
    filter    rules + optional LLM judgement                                          -> filter.json (keep, reasons)
    rubric    LLM in stages: contributions -> requirements -> leaves, validated        -> rubric.json
    blacklist official repository URLs (+ optional search API, optional LLM addendum)  -> blacklist.txt, addendum.md
    tasks     task folders in the format tasks/paperbench.py loads                    -> <output_dir>/tasks/<paper_id>/
    distil    (factory/distil.py) teacher attempts, rejection sampling                 -> <output_dir>/distil/

pipeline.py runs the stages; store.py holds the per-paper markers (written atomically), so a killed run resumes
where it stopped and finished work is never redone. A paper that fails a stage is recorded with its reason and
skipped by the later stages; the run goes on.
"""
