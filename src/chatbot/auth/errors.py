from chatbot.errors import BadRequest, Unauthorized


class TokenExpired(Unauthorized):
    code = "token_expired"
    detail = "The token has expired"


class InvalidToken(Unauthorized):
    code = "invalid_token"
    detail = "The token is not valid"


class InvalidUserId(BadRequest):
    code = "invalid_user_id"
    detail = "X-User-Id is not a valid user id"
