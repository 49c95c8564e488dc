"""Shared helpers for the lessons: data, pictures and run plumbing (never the lesson itself)."""
