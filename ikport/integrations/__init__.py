"""ikport inside other libraries: `ikport.integrations.transformers` (Hugging Face transformers).

Nothing here is imported by `import ikport`; each integration imports its library when it is imported.
"""
