"""The web chat page served beside the OpenAI API (`qwenlm web`, `qwenlm serve --web`)."""
