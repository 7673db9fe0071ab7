"""Generation-based evaluation: `evaluation` (prompts from records, generation, scoring) and
`metrics` (ROUGE/BLEU, tool-call accuracy)."""
