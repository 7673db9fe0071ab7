"""Public data sets into this project's formats: `advertise_gen` (prompt/response) and
`tool_alpaca` (multi-turn tool conversations)."""
