//! The gRPC codec of the generated services: prost's, except that a message
//! that does not decode is INVALID_ARGUMENT rather than INTERNAL. Bytes that
//! are no valid message (broken framing, a string field that is not UTF-8)
//! are the sender's mistake, and CSI callers read INTERNAL as the driver's.
//! (Clients use the same codec, so a response that does not decode is
//! reported the same way.)

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct CsiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(self.0.decoder())
    }
}

pub struct CsiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                Status::invalid_argument(format!("message does not decode: {}", s.message()))
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
