from chatbot.errors import Unauthorized


class TokenExpired(Unauthorized):
    code = "token_expired"
    detail = "The token has expired"


class InvalidToken(Unauthorized):
    code = "invalid_token"
    detail = "The token is not valid"


class InvalidUserId(Unauthorized):
    code = "invalid_user_id"
    detail = "The user id is not valid: 1 to 255 printable characters, no space at either end"
