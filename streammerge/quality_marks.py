"""What the decoder-LLM quality benchmark (SmolLM2-135M-Instruct, five tasks, LoRA and OFT experts)
measured for each method against task arithmetic, shown by `streammerge methods`. Generated from
bench/results/quality-llm.json by `python bench/quality/llm_benchmark.py --marks
streammerge/quality_marks.py` (a test regenerates it and compares); not edited by hand."""

SOURCE = "bench/results/quality-llm.md"
MARKS: dict[str, list[str]] = {
    "dare_ties": [
        "OFT adapters, DARE-TIES: level with TA, +0.1 points (95 % CI -1.4, +1.6; 800 prompts)",
        "LoRA adapters, DARE-TIES: level with TA, -1.4 points (95 % CI -2.9, +0.2; 800 prompts)",
    ],
    "do_merging": [
        "OFT adapters, DO-Merging: level with TA, +0.1 points (95 % CI -1.6, +1.9; 800 prompts)",
        "LoRA adapters, DO-Merging: won over TA, +4.0 points (95 % CI +2.0, +6.0; 800 prompts)",
    ],
    "iso_c": [
        "OFT adapters, Iso-C: won over TA, +11.9 points (95 % CI +9.3, +14.5; 800 prompts)",
        "LoRA adapters, Iso-C: lost to TA, -21.3 points (95 % CI -24.8, -17.6; 800 prompts)",
    ],
    "iso_cts": [
        "OFT adapters, Iso-CTS: won over TA, +12.9 points (95 % CI +10.0, +15.6; 800 prompts)",
        "LoRA adapters, Iso-CTS: lost to TA, -23.6 points (95 % CI -27.0, -20.1; 800 prompts)",
    ],
    "karcher": [
        "OFT adapters, karcher: level with TA, -0.6 points (95 % CI -2.9, +1.6; 800 prompts)",
        "LoRA adapters, karcher: lost to TA, -2.5 points (95 % CI -4.5, -0.5; 800 prompts)",
    ],
    "model_stock": [
        "OFT adapters, model_stock: lost to TA, -3.8 points (95 % CI -6.6, -0.7; 800 prompts)",
        "LoRA adapters, model_stock: lost to TA, -24.6 points (95 % CI -28.2, -21.1; 800 prompts)",
    ],
    "ortho_svd": [
        "OFT adapters, SVD Ortho-Merge: won over TA, +15.4 points (95 % CI +12.0, +19.0; 800 prompts)",
        "LoRA adapters, SVD Ortho-Merge: lost to TA, -20.6 points (95 % CI -24.0, -17.1; 800 prompts)",
    ],
    "orthomerge": [
        "OFT adapters, OrthoMerge (generators): level with TA, -0.4 points (95 % CI -2.1, +1.5; 800 prompts)",
        "OFT adapters, Table 4: average R: level with TA, -2.7 points (95 % CI -6.5, +0.5; 400 prompts)",
        "OFT adapters, Table 4: product R: lost to TA, -23.3 points (95 % CI -29.0, -17.7; 400 prompts)",
        "OFT adapters, Table 4: average Q: level with TA, -2.7 points (95 % CI -6.5, +0.5; 400 prompts)",
        "OFT adapters, Table 4: magnitude-corrected: lost to TA, -15.7 points (95 % CI -20.7, -10.8; 400 prompts)",
        "LoRA adapters, OrthoMerge-G + TA: level with TA, +1.8 points (95 % CI +0.0, +3.8; 400 prompts)",
        "LoRA adapters, OrthoMerge-G + TSV-M: level with TA, +1.0 points (95 % CI -1.0, +3.0; 400 prompts)",
        "LoRA adapters, OrthoMerge-C + TA: level with TA, -0.2 points (95 % CI -0.6, +0.0; 800 prompts)",
        "LoRA adapters, OrthoMerge-C + TSV-M: level with TA, -3.2 points (95 % CI -7.0, +0.5; 400 prompts)",
    ],
    "ties": [
        "OFT adapters, TIES: won over TA, +4.4 points (95 % CI +2.1, +6.8; 800 prompts)",
        "LoRA adapters, TIES: lost to TA, -4.0 points (95 % CI -6.4, -1.8; 800 prompts)",
    ],
    "tsv": [
        "OFT adapters, TSV-M: won over TA, +8.3 points (95 % CI +5.6, +11.0; 800 prompts)",
        "LoRA adapters, TSV-M: lost to TA, -6.0 points (95 % CI -8.9, -3.2; 800 prompts)",
    ],
}
