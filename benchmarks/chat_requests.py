"""The benchmark's chat requests: 64+ prompts of very different lengths, written for hf_paged."""
from __future__ import annotations

QUESTIONS = [
    "What is 2 + 2?",
    "Name the planets of the solar system in order.",
    "Write a short poem about autumn leaves.",
    "Explain what a hash table is to a beginner.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the main causes of inflation?",
    "Describe how a bicycle works.",
    "Suggest a name for a bakery that sells only bread.",
    "What is the difference between weather and climate?",
    "Write a haiku about a cat sleeping in the sun.",
    "How do vaccines train the immune system?",
    "List five vegetables that grow well in cold climates.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What should I pack for a weekend hiking trip?",
]

ARTICLE = (
    "The city library reopened last spring after a two-year renovation. The old reading room, "
    "with its tall arched windows, now holds a children's section, a quiet study area and a small "
    "cafe run by volunteers. The architects kept the original oak shelves but added accessible "
    "ramps, brighter lighting and a rooftop garden where readers can sit in good weather. "
    "Visitors numbers doubled in the first month, and the library started evening classes in "
    "languages, computing and local history. The archive in the basement, which stores maps and "
    "newspapers going back to 1850, is being digitised so that anyone can search it online. "
)

SYSTEM = "You are a concise, friendly assistant. Answer clearly and stop when the answer is complete."


def chats() -> list[list[dict]]:
    """64 chats: bare questions, a system prompt, a long article as context, and a multi-turn chat."""
    out = []
    for i, q in enumerate(QUESTIONS):
        out.append([{"role": "user", "content": q}])
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        context = ARTICLE * (1 + i % 4)  # ~130 to ~520 words of context
        out.append([{"role": "user", "content": f"Read this article:\n{context}\nNow answer: {q}"}])
        out.append([
            {"role": "user", "content": "Hi! I have a few questions today."},
            {"role": "assistant", "content": "Of course, ask me anything."},
            {"role": "user", "content": q},
        ])
    return out
