"""Cached decoding, log-probabilities, the HTTP server and its OpenAI protocol, chat, export and int8."""
