FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
COPY prompts ./prompts
RUN pip install . && useradd --system --uid 10001 chatbot
USER chatbot

# Authentication is required off loopback: set CHATBOT_JWT_SECRET (32+ characters).
ENV CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["sh", "-c", "chatbot migrate && exec chatbot serve"]
