"""The embedded tiny chat model: its synthetic corpus and the script that trains it."""
