"""What the decoder-LLM quality benchmark (SmolLM2-135M-Instruct, five tasks, LoRA and OFT experts)
measured for each method against task arithmetic, shown by `streammerge methods`. Generated from
bench/results/quality-llm.json by `python bench/quality/llm_benchmark.py --marks
streammerge/quality_marks.py` (a test regenerates it and compares); not edited by hand."""

SOURCE = "bench/results/quality-llm.md"
MARKS: dict[str, list[str]] = {
    "dare_ties": [
        "OFT adapters, DARE-TIES: level with TA, -0.6 points (95 % CI -1.8, +0.6; 1200 prompts)",
        "LoRA adapters, DARE-TIES: lost to TA, -1.7 points (95 % CI -3.0, -0.3; 1200 prompts)",
    ],
    "do_merging": [
        "OFT adapters, DO-Merging: level with TA, +1.0 points (95 % CI -0.4, +2.4; 1200 prompts)",
        "LoRA adapters, DO-Merging: won over TA, +4.1 points (95 % CI +2.6, +5.6; 1200 prompts)",
    ],
    "iso_c": [
        "OFT adapters, Iso-C: won over TA, +7.8 points (95 % CI +5.6, +9.8; 1200 prompts)",
        "LoRA adapters, Iso-C: lost to TA, -16.1 points (95 % CI -18.9, -13.3; 1200 prompts)",
    ],
    "iso_cts": [
        "OFT adapters, Iso-CTS: won over TA, +8.0 points (95 % CI +5.8, +10.2; 1200 prompts)",
        "LoRA adapters, Iso-CTS: lost to TA, -19.2 points (95 % CI -22.0, -16.4; 1200 prompts)",
    ],
    "karcher": [
        "OFT adapters, karcher: level with TA, +0.4 points (95 % CI -1.2, +2.1; 1200 prompts)",
        "LoRA adapters, karcher: lost to TA, -3.6 points (95 % CI -5.2, -2.0; 1200 prompts)",
    ],
    "model_stock": [
        "OFT adapters, model_stock: lost to TA, -4.1 points (95 % CI -6.3, -1.8; 1200 prompts)",
        "LoRA adapters, model_stock: lost to TA, -25.8 points (95 % CI -28.7, -22.9; 1200 prompts)",
    ],
    "ortho_svd": [
        "OFT adapters, SVD Ortho-Merge: won over TA, +12.5 points (95 % CI +9.7, +15.3; 1200 prompts)",
        "LoRA adapters, SVD Ortho-Merge: lost to TA, -15.6 points (95 % CI -18.3, -12.7; 1200 prompts)",
    ],
    "orthomerge": [
        "OFT adapters, OrthoMerge (generators): level with TA, +0.6 points (95 % CI -0.8, +2.2; 1200 prompts)",
        "OFT adapters, Table 4: average R: level with TA, -2.7 points (95 % CI -6.5, +0.5; 400 prompts)",
        "OFT adapters, Table 4: product R: lost to TA, -23.3 points (95 % CI -29.0, -17.7; 400 prompts)",
        "OFT adapters, Table 4: average Q: level with TA, -2.7 points (95 % CI -6.5, +0.5; 400 prompts)",
        "OFT adapters, Table 4: magnitude-corrected: lost to TA, -15.7 points (95 % CI -20.7, -10.8; 400 prompts)",
        "LoRA adapters, OrthoMerge-G + TA: level with TA, +1.8 points (95 % CI +0.0, +3.8; 400 prompts)",
        "LoRA adapters, OrthoMerge-G + TSV-M: level with TA, +1.0 points (95 % CI -1.0, +3.0; 400 prompts)",
        "LoRA adapters, OrthoMerge-C + TA: level with TA, -0.2 points (95 % CI -0.6, +0.0; 1200 prompts)",
        "LoRA adapters, OrthoMerge-C + TSV-M: level with TA, -3.2 points (95 % CI -7.0, +0.5; 400 prompts)",
    ],
    "ties": [
        "OFT adapters, TIES: won over TA, +3.0 points (95 % CI +1.3, +4.7; 1200 prompts)",
        "LoRA adapters, TIES: lost to TA, -4.8 points (95 % CI -6.8, -2.9; 1200 prompts)",
    ],
    "tsv": [
        "OFT adapters, TSV-M: won over TA, +6.0 points (95 % CI +3.8, +8.3; 1200 prompts)",
        "LoRA adapters, TSV-M: lost to TA, -4.4 points (95 % CI -6.8, -2.1; 1200 prompts)",
    ],
}
